"""summarize: every evaluation table into results/tables (long Parquet + a Markdown table)."""
from __future__ import annotations

import json

import pandas as pd

from .. import config
from ..errors import VlddError
from ..io import atomic_path, provenance, read_parquet_meta, write_parquet
from ..metrics import METRIC_ORDER

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


def _encoders(path) -> str:
    """'image encoder (trainable) + text encoder (pooling)' from an evaluation table's
    provenance, for the encoder ablation; empty when it is not recorded."""
    try:
        model = json.loads(read_parquet_meta(path).get("config_json", "{}")).get("model", {})
    except (ValueError, AttributeError):
        return ""
    if not isinstance(model, dict) or not model.get("image_encoder"):
        return ""
    model = config.fill("model", model)   # keys an older file lacks: the schema's defaults
    img, txt = model["image_encoder"], model["text_encoder"]
    trainable = img["trainable"]
    if trainable == "lora":
        trainable = f"LoRA r{img['lora']['rank']}"
    return f"{img['name']} ({trainable}) + {txt['name']} ({txt['pooling']})"


def _cells(by) -> str:
    cells = []
    for m in METRIC_ORDER:
        mean, std = by.loc[m, "mean"], by.loc[m, "std"]
        cells.append(f"{mean:.1f} +- {0.0 if pd.isna(std) else std:.1f}")
    return " | ".join(cells)


def ablation_lines(long: pd.DataFrame, main_method: str = "mtt") -> list:
    """The ablation tables of the paper, from the distilled sets' evaluations: per dataset
    and budget, (1) encoders and LoRA: the main distillation of every model (encoder pair);
    (2) single modality and initialisation: the main distillation and its variants, per
    model; (3) cross-architecture: each model's distilled sets trained with other image
    encoders. Rows appear only for what was run."""
    main = f"distilled-{main_method}"
    dist = long[long["method"].str.startswith("distilled")]
    header = ("| {} | seeds | " + " | ".join(METRIC_ORDER) + " |\n"
              "|---|---|" + "---|" * len(METRIC_ORDER))
    lines = ["# Ablations (distilled sets), mean +- std over evaluation seeds", "",
             f"The main distillation is `{main}`; variants are `{main}_<name>` "
             "(`distill.variants`), other encoder pairs are other models (their evaluations "
             "added with `tables.include`), cross-architecture runs are `<model>@<label>` "
             "(`evaluate.cross_architectures`). TR = image-to-text, IR = text-to-image recall "
             "in percent.", ""]
    if dist.empty:
        return lines + ["No distilled sets were evaluated.", ""]
    stats = (dist.groupby(["dataset", "model", "encoders", "method", "budget", "metric"],
                          dropna=False)["value"].agg(["mean", "std", "count"]).reset_index())

    def rows(block, label):
        out = []
        for key, grp in block.groupby(["model", "encoders", "method"], sort=True, dropna=False):
            by = grp.set_index("metric")
            out.append(f"| {label(*key)} | {int(by['count'].iloc[0])} | {_cells(by)} |")
        return out

    for dataset, block in stats.groupby("dataset", sort=True):
        lines += [f"## {dataset or '(dataset)'}", ""]
        for budget, b in block.groupby("budget", sort=True):
            lines += [f"### {budget} pairs", ""]
            cross = b["model"].str.contains("@", regex=False)
            enc = b[~cross & (b["method"] == main)]
            if len(enc):
                lines += ["Encoders and LoRA (image encoder (trained part) + text encoder "
                          "(pooling)):", "", header.format("model")]
                lines += rows(enc, lambda m, e, _: f"{m}: {e}" if e else m)
                lines.append("")
            var = b[~cross]
            if (var["method"] != main).any():
                lines += ["Single modality and initialisation (`distill.variants`):", "",
                          header.format("model / method")]
                lines += rows(var, lambda m, _e, meth: f"{m} / {meth}")
                lines.append("")
            if cross.any():
                base = b[b["model"].isin(set(b.loc[cross, "model"].str.split("@").str[0]))]
                xb = pd.concat([base[~base["model"].str.contains("@", regex=False)], b[cross]])
                lines += ["Cross-architecture (distilled with the model's image encoder, "
                          "trained and tested with another):", "",
                          header.format("trained with / method")]
                lines += rows(xb, lambda m, e, meth: f"{m.split('@')[1] if '@' in m else 'same (' + m + ')'} / {meth}")
                lines.append("")
    return lines


def _refuse_repeated_evaluations(long: pd.DataFrame) -> None:
    """One evaluation (dataset, model, method, budget, seed) read from two files would count
    twice in the mean and the std: the same run included twice, or an included file that
    repeats one of this run's evaluations."""
    key = ["dataset", "model", "method", "budget", "seed", "metric"]
    sources = long.groupby(key, dropna=False)["_source"].unique()
    repeated = sources[sources.map(len) > 1]
    if len(repeated):
        (dataset, model, method, budget, seed, *_), files = repeated.index[0], repeated.iloc[0]
        raise VlddError(
            f"the evaluation of {method} at {budget} pairs, seed {seed} ({dataset}"
            f"{' / ' + model if model else ''}) is in {len(files)} files: "
            f"{', '.join(sorted(files))}. A table counts each evaluation once: narrow "
            "tables.include so that it matches each earlier run once and none of this run's "
            "files.")


def summarize(eval_paths, out_parquet, out_md, out_ablations=None, main_method="mtt"):
    frames = []
    for p in eval_paths:
        try:
            frame = pd.read_parquet(p)
        except Exception as exc:  # noqa: BLE001
            raise VlddError(f"{p}: unreadable evaluation table ({exc}); delete it and rerun "
                            "evaluate.") from exc
        frame["encoders"] = _encoders(p)
        frame["_source"] = str(p)
        frames.append(frame)
    if not frames:
        raise VlddError("summarize got no evaluation tables.")
    long = pd.concat(frames, ignore_index=True)
    long["model"] = long["model"].fillna("") if "model" in long else ""
    _refuse_repeated_evaluations(long)
    long = long.drop(columns="_source")
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
            lines.append(f"| {_letter(method)} | {method} | {int(by['count'].iloc[0])} | "
                         f"{_cells(by)} |")
        lines.append("")
    if out_ablations is not None:
        with atomic_path(out_ablations) as tmp:
            tmp.write_text("\n".join(ablation_lines(long, main_method)))
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n".join(lines))
