"""What the loss and the learned S contribute to the methods' recall (issue 12's orderings):
every distilled set of a benchmarks/methods.sh run evaluated again, once with InfoNCE (S
ignored: evaluate.loss infonce) and once with the weighted BCE (against its S, or the identity
for a set without one: evaluate.loss wbce), with the evaluation seeds and settings of the run.

    python benchmarks/methods_loss.py WORKDIR [--methods mtt,lors,repblend,ptmst] [--out FILE]
                                      [--threads N] [--run REPORT]

WORKDIR is methods.sh's (one folder per numeric path, native and/or default); each path is
evaluated in a process of its own (default: ATEN_CPU_CAPABILITY=default). Prints a markdown
report (and writes it to --out): per path and method, TR@1 / IR@1 with each loss, mean +- std
over the distillation seeds (each the mean over its evaluation seeds), the worst seed, and
the difference InfoNCE - WBCE. A set's own loss (evaluate.loss auto) is one of the two, so
the run's own figures for it must come out again: the report checks that.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

SEEDS = ("", "_s1", "_s2")
LOSSES = ("infonce", "wbce")


def sets(results: Path, methods):
    """{(method, seed suffix): pairs.h5} of the run, and the model folder name."""
    found = sorted(results.glob("*/distilled/*/*/n*/pairs.h5"))
    out = {}
    for p in found:
        name = p.parent.parent.name
        for m in methods:
            for s in SEEDS:
                if name == f"{m}{s}":
                    out[(m, s)] = p
    return out


def child(path_dir: Path, methods, out_json: Path, threads: int):
    """Evaluate every set of one numeric path with each loss; write the TR@1 / IR@1 rows."""
    import torch

    from vldd.io import read_parquet_meta
    from vldd.stages.evaluate import evaluate

    if threads:
        torch.set_num_threads(threads)
    results = path_dir / "results"
    rows = []
    with_tmp = path_dir / "methods_loss"
    with_tmp.mkdir(exist_ok=True)
    for (method, suffix), pairs in sets(results, methods).items():
        dataset, model = pairs.parents[4].name, pairs.parents[2].name
        own = sorted(results.glob(f"{dataset}/eval/{model}/distilled-{method}{suffix}/"
                                  f"{pairs.parent.name}/seed*.parquet"))
        cfg = json.loads(read_parquet_meta(own[0])["config_json"])
        text = cfg["model"]["text_encoder"]["name"]
        for loss in LOSSES:
            for f in own:
                seed = int(f.stem[4:])
                out = with_tmp / f"{method}{suffix}-{loss}-{seed}.parquet"
                evaluate(results / dataset / "data", results / dataset / "embeddings" /
                         f"{text}.h5", pairs, cfg["model"], {**cfg["evaluate"], "loss": loss},
                         seed, out, dataset=dataset, device="cpu")
                for kind, df in (("again", pd.read_parquet(out)), ("run", pd.read_parquet(f))):
                    for _, r in df[df["metric"].isin(["TR@1", "IR@1"])].iterrows():
                        rows.append({"method": method, "seed": suffix, "loss": loss,
                                     "eval_seed": seed, "source": kind,
                                     "metric": r["metric"], "value": float(r["value"])})
    out_json.write_text(json.dumps(rows))


def _cell(per_seed: pd.DataFrame) -> str:
    mean, std = per_seed.mean(), per_seed.std(ddof=0)
    return (f"{mean['TR@1']:.1f} +- {std['TR@1']:.1f} / {mean['IR@1']:.1f} +- "
            f"{std['IR@1']:.1f}")


def section(name: str, rows: pd.DataFrame, methods) -> list[str]:
    again = rows[rows["source"] == "again"]
    per = again.groupby(["method", "loss", "seed", "metric"])["value"].mean().unstack()
    lines = [f"### {name}", "",
             "| method | set's own loss | InfoNCE TR@1 / IR@1 | worst seed | WBCE TR@1 / IR@1 | "
             "worst seed | InfoNCE - WBCE (mean of TR@1 and IR@1), per seed | own loss as in "
             "the run |", "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        if method not in per.index.get_level_values(0):
            continue
        cells, worst = {}, {}
        for loss in LOSSES:
            s = per.loc[(method, loss)]
            cells[loss] = _cell(s)
            w = s.loc[(s["TR@1"] + s["IR@1"]).idxmin()]
            worst[loss] = f"{w['TR@1']:.1f} / {w['IR@1']:.1f}"
        gap = ((per.loc[(method, "infonce")] - per.loc[(method, "wbce")]).mean(axis=1))
        own = "infonce" if method == "mtt" else "wbce"
        mine = again[(again["method"] == method) & (again["loss"] == own)]
        run = rows[(rows["method"] == method) & (rows["source"] == "run") &
                   (rows["loss"] == own)]
        same = np.array_equal(mine.sort_values(["seed", "eval_seed", "metric"])["value"],
                              run.sort_values(["seed", "eval_seed", "metric"])["value"])
        lines.append(f"| {method} | {own} | {cells['infonce']} | {worst['infonce']} | "
                     f"{cells['wbce']} | {worst['wbce']} | "
                     + ", ".join(f"{v:+.1f}" for v in gap) + f" | {'yes' if same else 'NO'} |")
    return lines + [""]


def each_path(script, workdir: Path, name: str, args: list):
    """(path, rows) for each numeric path folder (native, default) of a methods.sh WORKDIR:
    `script` run again on it with `args` and --child in a process of its own on that path
    (ATEN_CPU_CAPABILITY=default for default), its JSON rows (folder/<name>.json) read back."""
    for path in ("native", "default"):
        folder = workdir / path
        if not folder.is_dir():
            continue
        env = dict(os.environ)
        if path == "default":
            env["ATEN_CPU_CAPABILITY"] = "default"
        out = folder / f"{name}.json"
        subprocess.run([sys.executable, str(script), str(folder), *args, "--child", str(out)],
                       env=env, check=True)
        yield path, json.loads(out.read_text())


def short_commit() -> str:
    """The benchmarks' checkout's HEAD, abbreviated."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=Path(__file__).parent).stdout.strip()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--methods", default="mtt,lors,repblend,ptmst")
    p.add_argument("--out", type=Path)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--run", default="benchmarks/methods.md",
                   help="the report of the methods.sh run whose WORKDIR this is (for the header)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    if a.child:
        child(a.workdir, methods, a.child, a.threads)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from emoji_report import cpu_model

    start, lines = time.time(), []
    for path, rows in each_path(__file__, a.workdir, "methods_loss",
                                ["--methods", a.methods, "--threads", str(a.threads)]):
        lines += section(path, pd.DataFrame(rows), methods)
    commit = short_commit()
    secs = int(time.time() - start)
    head = ["# The loss and S: each distilled set trained with InfoNCE and with the weighted BCE",
            "", f"`python benchmarks/methods_loss.py WORKDIR --methods {a.methods}"
            + (f" --threads {a.threads}" if a.threads else "")
            + (f" --run {a.run}" if a.run != "benchmarks/methods.md" else "") + "` on the "
            f"workdir of the benchmarks/methods.sh run in {a.run}; run "
            f"{pd.Timestamp.now():%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu_model()}), no "
            f"GPU, git {commit}: {secs // 60} min {secs % 60} s.", "",
            "Recall in percent; a seed's figure is the mean over the run's 3 evaluation seeds; "
            "mean +- std over the 3 distillation seeds. InfoNCE: evaluate.loss infonce (a "
            "learned S ignored); WBCE: evaluate.loss wbce (against the set's S; the identity "
            "for mtt's sets, which hold none). The last column checks that the set's own loss "
            "gives the run's figures again, evaluation seed by seed.", ""]
    report = "\n".join(head + lines)
    print(report)
    if a.out:
        a.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
