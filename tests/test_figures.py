"""The figures: rendered from real artifacts, reproducible, and saying what they should."""
from __future__ import annotations

import numpy as np
import pandas as pd
from PIL import Image

from conftest import DISTILL, EVAL, MODEL
from vldd.stages import figures
from vldd.cli import main
from vldd.stages.distill import distill
from vldd.stages.evaluate import evaluate
from vldd.pairset import read_pairset
from vldd.stages.summarize import summarize


def test_figures_render_from_a_distilled_set_and_a_table(store, tmp_path):
    d = tmp_path
    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, DISTILL, 6,
            d / "pairs.h5", d / "curve.parquet", device="cpu")
    evaluate(store / "data", store / "emb.h5", d / "pairs.h5", MODEL, EVAL, 0, d / "ev.parquet",
             dataset="t", device="cpu")
    summarize([d / "ev.parquet"], d / "table.parquet", d / "table.md")
    args = ["figures", "--data", str(store / "data"), "--embeddings", str(store / "emb.h5"),
            "--pairs", str(d / "pairs.h5"), "--curve", str(d / "curve.parquet"),
            "--table", str(d / "table.parquet"), "--out-examples", str(d / "ex.png"),
            "--out-curve", str(d / "curve.png"), "--out-recall", str(d / "recall.png")]
    assert main(args) == 0
    sizes = {}
    for name in ("ex.png", "curve.png", "recall.png"):
        with Image.open(d / name) as im:
            im.verify()
            sizes[name] = im.size
            assert im.size[0] > 300 and im.size[1] > 150, (name, im.size)
    first = {n: (d / n).read_bytes() for n in sizes}
    assert main(args) == 0  # the same artifacts draw the same bytes
    assert all((d / n).read_bytes() == first[n] for n in sizes)
    assert main(["figures"]) == 2  # nothing asked for: an error, not an empty success


def test_nearest_caption_of_a_real_initial_text_is_its_own_caption(store, tmp_path):
    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, DISTILL, 6,
            tmp_path / "pairs.h5", tmp_path / "curve.parquet", device="cpu")
    ps = read_pairset(tmp_path / "pairs.h5")
    caps = pd.read_parquet(store / "data/captions.parquet").set_index("caption_id")
    got = figures.nearest_captions(ps.init_texts, store / "data", store / "emb.h5")
    assert got == list(caps.loc[ps.caption_ids, "caption"])
    # a shuffled query finds other captions: the lookup depends on the query
    shuffled = figures.nearest_captions(np.roll(ps.init_texts, 1, axis=0), store / "data",
                                        store / "emb.h5")
    assert shuffled == list(np.roll(np.array(got, dtype=object), 1))
