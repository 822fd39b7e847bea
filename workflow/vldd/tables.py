"""summarize: every evaluation table into results/tables (long Parquet + a Markdown table)."""
from __future__ import annotations

import pandas as pd

from .errors import VlddError
from .experts import METRIC_ORDER
from .io import atomic_path, provenance, write_parquet

METHOD_ORDER = ("coreset-random", "coreset-herding", "coreset-kcenter", "coreset-forgetting")


def _method_key(method: str):
    if method in METHOD_ORDER:
        return (0, METHOD_ORDER.index(method), method)
    if method.startswith("distilled"):
        return (1, 0, method)
    return (2, 0, method)  # full data last


def _letter(method: str) -> str:
    letters = {"coreset-random": "R", "coreset-herding": "H", "coreset-kcenter": "K",
               "coreset-forgetting": "F", "full": "full"}
    return letters.get(method, "distilled" if method.startswith("distilled") else "")


def summarize(eval_paths, out_parquet, out_md):
    frames = []
    for p in eval_paths:
        try:
            frames.append(pd.read_parquet(p))
        except Exception as exc:  # noqa: BLE001
            raise VlddError(f"{p}: unreadable evaluation table ({exc}); delete it and rerun "
                            "evaluate.") from exc
    if not frames:
        raise VlddError("summarize got no evaluation tables.")
    long = pd.concat(frames, ignore_index=True)
    long["model"] = long["model"].fillna("") if "model" in long else ""
    long = long.sort_values(["dataset", "model", "method", "budget", "seed", "direction", "k"],
                            kind="stable").reset_index(drop=True)
    write_parquet(long, out_parquet, meta=provenance("table", {"inputs": sorted(map(str, eval_paths))}))
    stats = (long.groupby(["dataset", "model", "method", "budget", "metric"])["value"]
             .agg(["mean", "std", "count"]).reset_index())
    header = ("|  | method | seeds | " + " | ".join(METRIC_ORDER) + " |\n"
              "|---|---|---|" + "---|" * len(METRIC_ORDER))
    lines = ["# Retrieval (test split), mean +- std over evaluation seeds", "",
             "The paper's Table 1 layout: per budget, the coresets R (random), H (herding), "
             "K (k-center), F (forgetting), then the distillations (ablation variants are "
             "`<method>_<name>`); TR = image-to-text, IR = text-to-image recall in percent.", ""]
    for (dataset, model), block in stats.groupby(["dataset", "model"], sort=True):
        lines += [f"## {dataset or '(dataset)'}" + (f" / {model}" if model else ""), ""]
        rows = sorted(block.groupby(["method", "budget"]),
                      key=lambda kv: (kv[0][0] == "full", kv[0][1], _method_key(kv[0][0])))
        current = None
        for (method, budget), grp in rows:
            section = "full data" if method == "full" else f"{budget} pairs"
            if section != current:
                lines += ([""] if current else []) + [f"### {section}", "", header]
                current = section
            by = grp.set_index("metric")
            cells = []
            for m in METRIC_ORDER:
                mean, std = by.loc[m, "mean"], by.loc[m, "std"]
                cells.append(f"{mean:.1f} +- {0.0 if pd.isna(std) else std:.1f}")
            lines.append(f"| {_letter(method)} | {method} | {int(by['count'].iloc[0])} | "
                         + " | ".join(cells) + " |")
        lines.append("")
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines))
