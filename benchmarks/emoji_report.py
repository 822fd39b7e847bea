"""The report of benchmarks/emoji.sh: a summary over distillation seeds and numeric paths, then
the workflow's own retrieval table of each path.

    python benchmarks/emoji_report.py WORKDIR SECONDS COMMIT COMMAND PATH [PATH ...]
"""
from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

import pandas as pd
import torch

SEED_METHODS = {"distilled-mtt": 0, "distilled-mtt_s1": 1, "distilled-mtt_s2": 2}
CORESETS = ["coreset-random", "coreset-herding", "coreset-kcenter", "coreset-forgetting"]


def cpu_model() -> str:
    info = Path("/proc/cpuinfo")
    for line in info.read_text().splitlines() if info.exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def r1_means(results: Path) -> pd.DataFrame:
    """TR@1 / IR@1 per (budget, method), mean over evaluation seeds (full data: its own budget)."""
    ev = pd.concat(pd.read_parquet(p) for p in results.glob("*/eval/*/*/**/seed*.parquet"))
    ev = ev[ev["metric"].isin(["TR@1", "IR@1"])]
    return ev.groupby(["budget", "method", "metric"])["value"].mean().unstack()


def curves(results: Path) -> dict:
    out = {}
    for p in results.glob("*/distilled/*/*/n*/curve.parquet"):
        c = pd.read_parquet(p)
        k = max(1, len(c) // 5)
        out[(int(p.parent.name[1:]), f"distilled-{p.parent.parent.name}")] = (
            c["matching_loss"][-k:].mean() / c["matching_loss"][:k].mean())
    return out


def summary(path: str, results: Path) -> list[str]:
    m = r1_means(results)
    ratio = curves(results)
    full = m.xs("full", level="method").iloc[0]
    pair_budgets = sorted(set(m.index.get_level_values("budget")) - set(m.xs("full", level="method").index))
    lines = [f"### {path}", "",
             f"Full data: TR@1 {full['TR@1']:.1f}, IR@1 {full['IR@1']:.1f}.", "",
             "| pairs | distilled TR@1 (3 seeds) | IR@1 | worst seed TR@1 / IR@1 | best coreset TR@1 | "
             "best coreset IR@1 | wins (of 3) | % of full R@1 | image-only TR@1 / IR@1 | random TR@1 / IR@1 "
             "| loss last/first |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for budget in pair_budgets:
        mb = m.xs(budget, level="budget")
        seeds = mb.loc[[k for k in SEED_METHODS if k in mb.index]]
        cores = mb.loc[[k for k in CORESETS if k in mb.index]]
        best_tr, best_ir = cores["TR@1"].max(), cores["IR@1"].max()
        wins = int(((seeds["TR@1"] > best_tr) & (seeds["IR@1"] > best_ir)).sum())
        worst = seeds.loc[(seeds["TR@1"] + seeds["IR@1"]).idxmin()]
        pct = 100 * (seeds["TR@1"] + seeds["IR@1"]).mean() / (full["TR@1"] + full["IR@1"])
        img = mb.loc["distilled-mtt_imageonly"] if "distilled-mtt_imageonly" in mb.index else None
        rnd = mb.loc["coreset-random"]
        loss = [ratio[(budget, k)] for k in SEED_METHODS if (budget, k) in ratio]
        lines.append(
            f"| {budget} | {seeds['TR@1'].mean():.1f} +- {seeds['TR@1'].std():.1f} | "
            f"{seeds['IR@1'].mean():.1f} +- {seeds['IR@1'].std():.1f} | "
            f"{worst['TR@1']:.1f} / {worst['IR@1']:.1f} | "
            f"{best_tr:.1f} ({cores['TR@1'].idxmax().removeprefix('coreset-')}) | "
            f"{best_ir:.1f} ({cores['IR@1'].idxmax().removeprefix('coreset-')}) | {wins} | {pct:.0f}% | "
            + (f"{img['TR@1']:.1f} / {img['IR@1']:.1f} | " if img is not None else "- | ")
            + f"{rnd['TR@1']:.1f} / {rnd['IR@1']:.1f} | "
            f"{min(loss):.2f}-{max(loss):.2f} |")
    return lines + [""]


def main(argv: list[str]) -> None:
    work, secs, commit, command, paths = Path(argv[0]), int(argv[1]), argv[2], argv[3], argv[4:]
    out = [
        "# The emoji benchmark", "",
        f"Regenerate: `{command}` (DATA_DIR built by `../shared/datasets/emoji/prepare.py DATA_DIR`):",
        "`config/config.yaml` + `config/emoji.yaml` with distill.seed 0, 1, 2 (the variants s1, s2)",
        "and the image-only variant (`learn_texts: false`), on the numeric paths "
        + ", ".join(f"`{p}`" for p in paths) + " (`default`: ATEN_CPU_CAPABILITY=default).",
        f"Run {pd.Timestamp.now('UTC'):%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu_model()}; native "
        f"kernels {torch.backends.cpu.get_cpu_capability()}), no GPU, git {commit}: "
        f"{secs // 60} min {secs % 60} s wall for the whole command"
        + (f" (1-minute load average {os.environ['LOADS']})." if os.environ.get("LOADS") else "."),
        "",
        "Recall in percent; each distilled set's figure is the mean over its 3 evaluation seeds.",
        "`wins`: seeds whose set beats every coreset on TR@1 and IR@1. `% of full`: the seeds' mean",
        "TR@1 + IR@1 over full data's. `loss last/first`: the mean matching loss over the last 20% of",
        "iterations over the first 20% (range over the seeds).", "",
        "## Summary", ""]
    for path in paths:
        out += summary(path, work / path / "results")
    for path in paths:
        table = (work / path / "results" / "tables" / "retrieval.md").read_text()
        out += [f"## Retrieval tables, {path}", "", table.split("\n", 2)[2].strip(), ""]
    print("\n".join(out))


if __name__ == "__main__":
    main(sys.argv[1:])
