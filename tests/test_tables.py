"""The summary tables: the paper's Table 1 layout from evaluation Parquet files."""
from __future__ import annotations

import pandas as pd

from vldd.stages.evaluate import _frame
from vldd.metrics import METRIC_ORDER
from vldd.io import write_parquet
from vldd.stages.summarize import summarize


def _eval(path, method, budget, seed, value):
    metrics = {m: value + i for i, m in enumerate(METRIC_ORDER)}
    write_parquet(_frame(metrics, "flickr", method, budget, seed, "evaluate", "nf-bert"), path)


def test_table_has_the_papers_layout_and_correct_statistics(tmp_path):
    paths = []
    runs = [("distilled-mtt", 100, 10.0), ("coreset-kcenter", 100, 3.0),
            ("coreset-random", 100, 1.0), ("distilled-mtt_textonly", 100, 7.0),
            ("coreset-herding", 100, 2.0), ("coreset-forgetting", 100, 4.0),
            ("coreset-random", 20, 0.5), ("distilled-mtt", 20, 5.0), ("full", 145000, 40.0)]
    for method, budget, value in runs:
        for seed, delta in ((0, 0.0), (1, 2.0)):
            p = tmp_path / f"{method}-{budget}-{seed}.parquet"
            _eval(p, method, budget, seed, value + delta)
            paths.append(p)
    summarize(paths, tmp_path / "t.parquet", tmp_path / "t.md")
    md = (tmp_path / "t.md").read_text()
    assert "## flickr / nf-bert" in md
    # budgets ascending, the full data last
    assert md.index("### 20 pairs") < md.index("### 100 pairs") < md.index("### full data")
    block = md[md.index("### 100 pairs"):md.index("### full data")]
    rows = [line.split("|")[1:3] for line in block.splitlines() if line.startswith("| ")
            and "method" not in line]
    assert [(a.strip(), b.strip()) for a, b in rows] == [
        ("R", "coreset-random"), ("H", "coreset-herding"), ("K", "coreset-kcenter"),
        ("F", "coreset-forgetting"), ("distilled", "distilled-mtt"),
        ("distilled", "distilled-mtt_textonly")]
    # mean and (sample) std over the two seeds: values v and v + 2 -> mean v + 1, std 1.4
    line = next(ln for ln in block.splitlines() if "| distilled-mtt |" in ln)
    cells = [c.strip() for c in line.split("|")[4:-1]]
    assert cells[0] == "11.0 +- 1.4" and cells[5] == "16.0 +- 1.4"  # TR@1 and IR@10
    long = pd.read_parquet(tmp_path / "t.parquet")
    assert len(long) == len(paths) * 6 and set(long["model"]) == {"nf-bert"}


def _eval_of(path, model_cfg, model, method, budget, seed, value):
    """An evaluation table as evaluate writes it, with its model config in the provenance."""
    from vldd.io import provenance

    metrics = {m: value + i for i, m in enumerate(METRIC_ORDER)}
    write_parquet(_frame(metrics, "flickr", method, budget, seed, "evaluate", model), path,
                  meta=provenance("eval", {"model": model_cfg, "evaluate": {}}, seed=seed))


def test_ablation_tables_put_encoders_variants_and_cross_architectures_side_by_side(tmp_path):
    from vldd.stages.summarize import summarize

    nf = {"image_encoder": {"name": "nfnet_l0", "trainable": "all"},
          "text_encoder": {"name": "bert-base-uncased", "pooling": "cls"}}
    vit = {"image_encoder": {"name": "vit_tiny_patch16_224", "trainable": "lora",
                             "lora": {"rank": 4}},
           "text_encoder": {"name": "bert-base-uncased", "pooling": "cls"}}
    runs = [(nf, "nf-bert", "distilled-mtt", 10.0), (vit, "vit-lora", "distilled-mtt", 6.0),
            (nf, "nf-bert", "distilled-mtt_textonly", 7.0),
            (nf, "nf-bert", "coreset-random", 1.0),
            ({**nf, "image_encoder": {"name": "nf_resnet50", "trainable": "all"}},
             "nf-bert@r50", "distilled-mtt", 4.0)]
    paths = []
    for cfg, model, method, value in runs:
        for seed in (0, 1):
            p = tmp_path / f"{model}-{method}-{seed}.parquet"
            _eval_of(p, {**cfg, "name": model}, model, method, 100, seed, value + seed)
            paths.append(p)
    summarize(paths, tmp_path / "t.parquet", tmp_path / "t.md", tmp_path / "a.md", "mtt")
    md = (tmp_path / "a.md").read_text()
    enc = md[md.index("Encoders and LoRA"):md.index("Single modality")]
    var = md[md.index("Single modality"):md.index("Cross-architecture")]
    cross = md[md.index("Cross-architecture ("):]

    def row(block, label):
        return [c.strip() for c in next(ln for ln in block.splitlines()
                                        if ln.startswith(f"| {label}")).split("|")[1:-1]]

    # one row per encoder pair, labelled from the evaluation's provenance; no coresets, no
    # variants and no cross-architecture runs in the encoder table
    assert row(enc, "nf-bert: nfnet_l0 (all) + bert-base-uncased (cls)")[2] == "10.5 +- 0.7"
    assert row(enc, "vit-lora: vit_tiny_patch16_224 (LoRA r4) + bert-base-uncased (cls)")[2] \
        == "6.5 +- 0.7"
    assert "coreset" not in md and "textonly" not in enc and "nf-bert@" not in enc
    assert row(var, "nf-bert / distilled-mtt_textonly")[2] == "7.5 +- 0.7"
    assert row(var, "nf-bert / distilled-mtt |")[2] == "10.5 +- 0.7"
    assert row(cross, "r50 / distilled-mtt")[2] == "4.5 +- 0.7"
    assert row(cross, "same (nf-bert) / distilled-mtt |")[2] == "10.5 +- 0.7"
    assert "vit-lora" not in cross  # no cross-architecture run of that model
