"""The report of benchmarks/methods.sh: per numeric path and method, TR@1 / IR@1 over the
distillation seeds (each the mean over its evaluation seeds) against the coresets and full
data, and each method's time and memory per distillation job.

    python benchmarks/methods_report.py WORKDIR SECONDS COMMIT COMMAND "METHODS" MODEL PATH [PATH ...]
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from emoji_report import CORESETS, cpu_model   # (beside this file)

SEEDS = {"": 0, "_s1": 1, "_s2": 2}


def r1(results: Path, model: str) -> pd.DataFrame:
    """TR@1 / IR@1 per method (rows) of `model`, mean over the evaluation seeds."""
    ev = pd.concat(pd.read_parquet(p)
                   for p in results.glob(f"*/eval/{model}/*/**/seed*.parquet"))
    ev = ev[ev["metric"].isin(["TR@1", "IR@1"])]
    return ev.groupby(["method", "metric"])["value"].mean().unstack()


def job_cost(results: Path, model: str, method: str) -> tuple[float, float, float]:
    """(seconds per iteration, peak RSS in MB, loss last/first) of a method's distillation
    jobs: the rule's benchmark file (whole job: loading included) over the curve's length,
    the mean over its seeds."""
    per_it, rss, ratio = [], [], []
    for suffix in SEEDS:
        name = f"{method}{suffix}"
        for tsv in results.glob(f"benchmarks/*/distilled/{model}/{name}/n*.tsv"):
            curve = next(results.glob(f"*/distilled/{model}/{name}/{tsv.stem}/curve.parquet"))
            c = pd.read_parquet(curve)
            b = pd.read_csv(tsv, sep="\t")
            per_it.append(float(b["s"].iloc[-1]) / max(1, len(c)))
            rss.append(float(b["max_rss"].iloc[-1]))
            k = max(1, len(c) // 5)
            ratio.append(c["matching_loss"][-k:].mean() / c["matching_loss"][:k].mean())
    return (float(np.mean(per_it)) if per_it else float("nan"),
            float(np.max(rss)) if rss else float("nan"),
            float(np.max(ratio)) if ratio else float("nan"))


def section(path: str, results: Path, methods: list[str], model: str) -> list[str]:
    m = r1(results, model)
    full = m.loc["full"]
    cores = m.loc[[c for c in CORESETS if c in m.index]]
    lines = [f"### {path}", "",
             f"Full data: TR@1 {full['TR@1']:.1f}, IR@1 {full['IR@1']:.1f}. Coresets (TR@1 / IR@1): "
             + ", ".join(f"{c.split('-')[1]} {cores.loc[c, 'TR@1']:.1f} / {cores.loc[c, 'IR@1']:.1f}"
                         for c in cores.index) + ".", "",
             "| method | TR@1 (3 seeds) | IR@1 | worst seed TR@1 / IR@1 | seeds beating every "
             "coreset on both | % of full R@1 | s / iteration | peak RSS MB | loss last/first (max) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in methods:
        names = [f"distilled-{method}{s}" for s in SEEDS if f"distilled-{method}{s}" in m.index]
        if not names:
            continue
        s = m.loc[names]
        mean, std = s.mean(), s.std(ddof=0)
        worst = s.loc[(s["TR@1"] + s["IR@1"]).idxmin()]
        wins = int(((s["TR@1"] > cores["TR@1"].max()) & (s["IR@1"] > cores["IR@1"].max())).sum())
        pct = 100 * (mean["TR@1"] + mean["IR@1"]) / (full["TR@1"] + full["IR@1"])
        per_it, rss, ratio = job_cost(results, model, method)
        lines.append(f"| {method} | {mean['TR@1']:.1f} +- {std['TR@1']:.1f} | "
                     f"{mean['IR@1']:.1f} +- {std['IR@1']:.1f} | {worst['TR@1']:.1f} / "
                     f"{worst['IR@1']:.1f} | {wins} of {len(s)} | {pct:.0f}% | {per_it:.2f} | "
                     f"{rss:.0f} | {ratio:.2f} |")
    return lines + [""]


def main():
    work, secs, commit, command, methods, model = sys.argv[1:7]
    paths = sys.argv[7:]
    methods = methods.split()
    isa = torch.backends.cpu.get_cpu_capability()
    out = ["# The methods side by side: emoji, 100 pairs", "",
           f"Regenerate: `{command}` (DATA_DIR built by `../shared/datasets/emoji/prepare.py "
           "DATA_DIR`): `config/config.yaml` + `config/emoji.yaml` at budget 100, each method "
           f"with distill.seed 0, 1 and 2, each set evaluated with 3 seeds, model `{model}`"
           + (" (Lite0 frozen, image and text projection heads trained: "
              "`image_encoder.trainable: heads`)" if model.endswith("-heads") else "")
           + "; numeric paths " +
           ", ".join(f"`{p}`" for p in paths) + " (`default`: ATEN_CPU_CAPABILITY=default).",
           f"Run {pd.Timestamp.now():%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu_model()}; "
           f"native kernels {isa}), no GPU, git {commit}: {int(secs) // 60} min {int(secs) % 60} s "
           f"wall for the whole command (load average {os.environ.get('LOADS', '?')}).", "",
           "Recall in percent; a seed's figure is the mean over its 3 evaluation seeds. "
           "`s / iteration`: the distill job's wall time (loading included) over its "
           "iterations, mean over the seeds (it depends on what else ran on the machine); "
           "`peak RSS`: the largest of the seeds' jobs "
           "(Snakemake's benchmark files). LoRS distils 99 pairs and its similarity matrix for a "
           "budget of 100 (distill.lors.pay_for_similarity); so do RepBlend and PTM-ST."
           + (" PTM-ST (`ptmst`) is LoRS with a full S, matched to the shortcut "
              "trajectories of the experts' epochs 0-12 (rule shortcut_expert), and saves the "
              "moving average (decay 0.99) of its tensors." if "ptmst" in methods else "")
           + (f" Every method but CovMatch runs {os.environ['ITERATIONS']} iterations "
              "(methods.sh's ITERATIONS)." if os.environ.get("ITERATIONS") else "")
           + (" CovMatch runs 300 iterations (the others 150 unless said) with select last and "
              "covmatch.real_batch 1024 (methods.sh writes them into its config); its sets "
              "learn no lrs and train with evaluate.lr." if "covmatch" in methods else ""), ""]
    for path in paths:
        out += section(path, Path(work) / path / "results", methods, model)
    print("\n".join(out))


if __name__ == "__main__":
    main()
