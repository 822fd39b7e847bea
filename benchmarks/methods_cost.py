"""Time and peak memory per distillation iteration of each method (benchmarks/unroll.py
--method), as a table for benchmarks/methods.md.

    python benchmarks/methods_cost.py [--trainable heads] [--methods mtt,lors,repblend,ptmst,covmatch]
                                      [--engines exact,checkpointed,constant-memory]

Runs `benchmarks/unroll.py --method M --trainable T --sweep none --engines E` for each method
at unroll.py's default setting (64 px, 50 pairs, syn_steps 8, mini_batch 50; 3 timed
iterations after 1 warm-up, each engine in a fresh process) and prints one row per method and
engine from its JSON results: median seconds per iteration and peak memory above the setup.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trainable", default="heads")
    p.add_argument("--methods", default="mtt,lors,repblend,ptmst,covmatch")
    p.add_argument("--engines", default="exact,checkpointed,constant-memory")
    p.add_argument("--unroll-args", default="", help="more options of unroll.py (e.g. --quick)")
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for method in a.methods.split(","):
            run = subprocess.run(
                [sys.executable, str(HERE / "unroll.py"), "--method", method, "--trainable",
                 a.trainable, "--sweep", "none", "--engines", a.engines, "--out", out,
                 *a.unroll_args.split()],
                capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"unroll.py --method {method} failed ({run.returncode}):\n"
                         f"{run.stdout[-2000:]}{run.stderr[-2000:]}")
            result = json.loads(max(Path(out).glob(f"unroll-*.json"),
                                    key=lambda f: f.stat().st_mtime).read_text())
            check = result["gradient_check"]
            for r in result["rows"]:
                agree = check.get(r["engine"], {}).get("rel_err", {})
                rows.append((method, r["engine"], r["median_s"], r["peak_over_setup_mb"],
                             max(agree.values()) if agree else float("nan")))
            machine = result["machine"]
    extra = f" --unroll-args='{a.unroll_args}'" if a.unroll_args else ""
    print(f"`python benchmarks/methods_cost.py --trainable {a.trainable} --methods {a.methods} "
          f"--engines {a.engines}{extra}` (benchmarks/unroll.py, by default at 64 px, 50 pairs, "
          f"syn_steps 8, mini_batch 50; {machine['cpu_count']} CPUs, torch {machine['torch']}; "
          f"load average {machine.get('loadavg_start', ['?'])[0]:.2f} at the start):\n")
    print("| method | engine | s / iteration | peak MB above setup | gradient vs exact "
          "(largest relative L2 error of pixels, texts, lrs) |")
    print("|---|---|---|---|---|")
    for method, engine, sec, mb, err in rows:
        print(f"| {method} | {engine} | {sec:.2f} | {mb:.0f} | {err:.1e} |")


if __name__ == "__main__":
    main()
