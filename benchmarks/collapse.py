"""RepBlend's diagnosis, "modality collapse", measured on the sets of a benchmarks/methods.sh
run: within each modality, the mean cosine similarity between the distinct distilled pairs,
at the start (the pair set's /init) and in the saved set. Images: the features the trained
parts read (the frozen trunk's output, pooled over space when it is a map); texts: the
sentence embeddings. RepBlend's paper reports the intra-modal similarity of LoRS's distilled
data rising during distillation (0.512 -> 0.522 over 3000 iterations) and blending as its cure.
Beside it, the learned similarity matrix S of each set (LoRS's soft targets, which the weighted
BCE can only meet inside [0, 1]): its diagonal's mean and range, its off-diagonal entries'
standard deviation and the share of them above 0.5.

    python benchmarks/collapse.py WORKDIR [--methods lors,repblend] [--out FILE] [--run REPORT]

WORKDIR is methods.sh's (one folder per numeric path). Each path's sets are read in a process
of its own on that path (native kernels, or ATEN_CPU_CAPABILITY=default). Prints a markdown
table (and writes it to --out): per path and method, mean +- std over the distillation seeds
of the similarity at the start, in the saved set, and their difference per seed.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

SEEDS = ("", "_s1", "_s2")


def mean_offdiag_cosine(x) -> float:
    """Mean cosine similarity over the ordered pairs (i, j), i != j, of the rows of x."""
    import torch

    x = torch.nn.functional.normalize(torch.as_tensor(x, dtype=torch.float64).flatten(1), dim=1)
    n = len(x)
    gram = x @ x.t()
    return float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))


def similarity_stats(s: np.ndarray) -> dict:
    """S's diagonal (mean, range) and off-diagonal entries (std, share above 0.5)."""
    s = s.astype(np.float64)
    off = s[~np.eye(len(s), dtype=bool)]
    d = np.diag(s)
    return {"s_diag_mean": float(d.mean()), "s_diag_min": float(d.min()),
            "s_diag_max": float(d.max()), "s_off_std": float(off.std()),
            "s_off_above_half": float((off > 0.5).mean())}


def child(path_dir: Path, methods, out_json: Path):
    """The four similarities of every set of one numeric path, as JSON rows."""
    import torch

    from vldd.model import build_model, trunk_features
    from vldd.pairset import read_pairset

    rows, towers = [], {}
    for method in methods:
        for suffix in SEEDS:
            for pairs in sorted(path_dir.glob(f"results/*/distilled/*/{method}{suffix}/n*/"
                                              "pairs.h5")):
                ps = read_pairset(pairs)
                cfg = json.loads(ps.attrs["config_json"])
                s = ps.similarity_matrix()
                sim = {} if s is None else similarity_stats(s)
                key = json.dumps(cfg["model"], sort_keys=True)
                if key not in towers:
                    towers[key] = build_model(cfg["model"], ps.texts.shape[1], 0).tower
                tower = towers[key]
                tower.trunk.eval()

                def feats(images):
                    with torch.no_grad():
                        f = trunk_features(tower, torch.as_tensor(images), "cpu",
                                           normalized=True)
                    return f.mean(dim=(2, 3)) if f.dim() == 4 else f
                rows.append({"method": method, "seed": suffix or "_s0",
                             "image_init": mean_offdiag_cosine(feats(ps.init_images)),
                             "image": mean_offdiag_cosine(feats(ps.images)),
                             "text_init": mean_offdiag_cosine(ps.init_texts),
                             "text": mean_offdiag_cosine(ps.texts), **sim})
    out_json.write_text(json.dumps(rows))


def _ms(values) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} +- {v.std():.3f}"


def section(name: str, rows: list, methods) -> list[str]:
    lines = [f"### {name}", "",
             "| method | seeds | image: start | image: saved | image: saved - start, per seed "
             "| text: start | text: saved | text: saved - start, per seed | S: diagonal mean "
             "(range) | S: off-diagonal std | S: off-diagonal above 0.5 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["seed"])
        if not mine:
            continue
        cells = []
        for m in ("image", "text"):
            start = [r[f"{m}_init"] for r in mine]
            saved = [r[m] for r in mine]
            cells += [_ms(start), _ms(saved),
                      ", ".join(f"{b - a:+.3f}" for a, b in zip(start, saved))]
        if all("s_diag_mean" in r for r in mine):
            cells += [f"{np.mean([r['s_diag_mean'] for r in mine]):.2f} "
                      f"({min(r['s_diag_min'] for r in mine):.2f} to "
                      f"{max(r['s_diag_max'] for r in mine):.2f})",
                      _ms([r["s_off_std"] for r in mine]),
                      ", ".join(f"{100 * r['s_off_above_half']:.1f}%" for r in mine)]
        else:
            cells += ["no S"] * 3
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--methods", default="lors,repblend")
    p.add_argument("--out", type=Path)
    p.add_argument("--run", default="benchmarks/methods.md",
                   help="the report of the methods.sh run whose WORKDIR this is (for the header)")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    methods = a.methods.split(",")
    if a.child:
        child(a.workdir, methods, a.child)
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from emoji_report import cpu_model
    from methods_loss import each_path, short_commit

    start, lines = time.time(), []
    for path, rows in each_path(__file__, a.workdir, "collapse", ["--methods", a.methods]):
        lines += section(path, rows, methods)
    if not lines:
        sys.exit(f"{a.workdir}: no native/ or default/ folder of a benchmarks/methods.sh run")
    commit = short_commit()
    secs = int(time.time() - start)
    head = ["# Modality collapse: the intra-modal similarity of the distilled pairs", "",
            f"`python benchmarks/collapse.py WORKDIR --methods {a.methods} --run {a.run}` on "
            f"the workdir of the benchmarks/methods.sh run in {a.run}; run "
            f"{time.strftime('%Y-%m-%d')} on {os.cpu_count()} CPU cores ({cpu_model()}), no "
            f"GPU, git {commit}: {secs} s.", "",
            "Mean cosine similarity between distinct pairs within a modality (image: the "
            "frozen trunk's pooled features; text: the sentence embeddings), at the start of "
            "distillation (the pair set's /init) and in the saved set; mean +- std over the "
            "distillation seeds. S: the saved set's similarity matrix (the identity at the "
            "start); its diagonal's mean over the seeds and range over all their entries, "
            "and per seed the share of off-diagonal entries above 0.5.", ""]
    report = "\n".join(head + lines)
    print(report)
    if a.out:
        a.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
