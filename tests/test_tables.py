"""The summary tables: the paper's Table 1 layout from evaluation Parquet files."""
from __future__ import annotations

import pandas as pd

from vldd.evaluate import _frame
from vldd.experts import METRIC_ORDER
from vldd.io import write_parquet
from vldd.tables import summarize


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
