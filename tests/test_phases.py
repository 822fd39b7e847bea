"""PTM-ST's phased distillation (distill.phases, vldd.phases): the plan of the phases, the
pair set they make together, its evaluation phase by phase, resuming a killed phased run, and
the workflow's plan of the phases' shortcut trajectories."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from vldd import config, phases
from vldd.errors import VlddError
from vldd.model import build_model, logit_scale, trunk_features
from vldd.pairset import read_pairset
from vldd.realdata import RealData
from vldd.stages import distill as distill_stage
from vldd.stages.evaluate import evaluate
from vldd.stages.shortcut_expert import shortcut_expert
from vldd.train import train_contrastive
from vldd.prepared import load_embeddings, load_prepared

from conftest import DISTILL, EVAL, MODEL  # and the `store` fixture
from test_workflow import TINY, job_counts, snakemake

PHASED = {**DISTILL, "method": "ptmst", "lors": {"similarity": "full", "lr_sim": 0.05},
          "phases": [{"share": 2, "shortcut": [0, 3], "iterations": 3},
                     {"share": 1, "min_start_epoch": 1, "max_start_epoch": 2,
                      "iterations": 3}]}


@pytest.fixture(scope="module")
def experts(store, tmp_path_factory):
    """The store's expert as trained and its shortcut over epochs 0-3."""
    short = tmp_path_factory.mktemp("short") / "shortcut_0_3" / "expert_0.h5"
    shortcut_expert(store / "expert_0.h5", (0, 3), short)
    return [store / "expert_0.h5", short]


def test_split_gives_each_phase_its_share_largest_remainders_first():
    assert phases.split(499, [200, 299]) == [200, 299]      # PTM-ST at 500 pairs
    assert phases.split(9, [2, 1]) == [6, 3]
    assert phases.split(10, [1, 1, 1]) == [4, 3, 3]
    assert sum(phases.split(97, [0.3, 0.5, 0.2])) == 97


def test_the_plan_gives_each_phase_its_pairs_settings_seed_and_window_experts(experts, tmp_path):
    cfg = config.section("distill", PHASED)
    plan = phases.plan(cfg, 10, experts, tmp_path / "pairs.h5.ckpt.h5")
    assert [p.budget for p in plan] == [6, 3]    # 9 pairs (one pays for S) as 2 : 1
    first, second = plan
    assert first.experts == [experts[1]] and second.experts == [experts[0]]
    assert (first.cfg["shortcut"], first.cfg["iterations"], first.cfg["min_start_epoch"]) == \
        ([0, 3], 3, 0)
    assert (second.cfg["shortcut"], second.cfg["min_start_epoch"],
            second.cfg["max_start_epoch"]) == (None, 1, 2)
    assert first.cfg["seed"] == 0 and second.cfg["seed"] not in (0, 1, 2)
    assert not first.cfg["lors"]["pay_for_similarity"] and first.cfg["phases"] is None
    assert first.cfg["lors"]["similarity"] == "full"       # distill's where the phase is silent
    assert second.checkpoint.name == "pairs.h5.ckpt.phase1.h5"
    # without phases: one phase, the settings, budget and experts as given
    one = phases.plan(config.section("distill", DISTILL), 10, experts, tmp_path / "c.h5")
    assert len(one) == 1 and one[0].budget == 10 and one[0].experts == experts
    assert one[0].cfg == config.section("distill", DISTILL).as_dict()


@pytest.mark.parametrize("change, match", [
    ({"phases": [{"share": 8}, {"share": 1}]}, r"phase 1 gets 1 of the 9 pairs"),
    ({"phases": [{"share": 1, "shortcut": [1, 3]}]}, r"distill.phases\[0\].*epochs \[1, 3\]"),
    ({"phases": [{"share": 1, "min_start_epoch": 2}]}, r"min_start_epoch 2 >= max_start_epoch"),
])
def test_a_phase_that_cannot_run_is_one_clear_error(experts, tmp_path, change, match):
    cfg = config.section("distill", {**PHASED, **change})
    with pytest.raises(VlddError, match=match):
        phases.plan(cfg, 10, experts, tmp_path / "c.h5")


def test_a_phased_distillation_writes_its_phases_in_order_and_resumes_to_identical_bytes(
        store, experts, tmp_path, monkeypatch):
    model, budget = MODEL, 10
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for out in (straight, resumed):
        out.mkdir()
    distill_stage.distill(store / "data", store / "emb.h5", experts, model, PHASED, budget,
                          straight / "pairs.h5", straight / "curve.parquet", device="cpu")
    ps = read_pairset(straight / "pairs.h5")
    assert ps.phases.tolist() == [0] * 6 + [1] * 3 and ps.budget == 10
    assert ps.phase_lrs.shape == (2, 2) and (ps.lr_image, ps.lr_text) == tuple(ps.phase_lrs[1])
    s = ps.similarity_matrix()
    assert s.shape == (9, 9) and not s[:6, 6:].any() and not s[6:, :6].any()
    curve = pd.read_parquet(straight / "curve.parquet")
    assert curve["phase"].tolist() == [0, 0, 0, 1, 1, 1]
    assert curve["iteration"].tolist() == list(range(6))
    assert set(curve.loc[curve["phase"] == 1, "start_epoch"]) == {1}   # its own start window
    from test_results_layout import ARTIFACTS, check_h5     # the file is as documented
    check_h5(straight / "pairs.h5", next(a for a in ARTIFACTS
                                         if a.pattern.endswith("/distilled/{model}/{method}/n{N}/pairs.h5")))
    # killed in phase 1 after phase 0 finished: phase 0 is read back from its checkpoint and
    # phase 1 goes on from its own; the rerun takes only phase 1's remaining iterations
    plan = phases.plan(config.section("distill", PHASED), budget, experts,
                       resumed / "pairs.h5.ckpt.h5")
    distill_stage.run_phase(store / "data", store / "emb.h5", model, plan[0], "cpu", False)
    d = distill_stage.Distiller(store / "data", store / "emb.h5", plan[1].experts, model,
                                plan[1].cfg, plan[1].budget, "cpu")
    d.iterate()
    from vldd.checkpoint import checkpoint_key, save_distiller
    save_distiller(d, plan[1].checkpoint,
                   checkpoint_key(model, plan[1].cfg, plan[1].budget, plan[1].experts))
    calls = []
    iterate = distill_stage.Distiller.iterate
    monkeypatch.setattr(distill_stage.Distiller, "iterate",
                        lambda self, *a: calls.append(1) or iterate(self, *a))
    distill_stage.distill(store / "data", store / "emb.h5", experts, model, PHASED, budget,
                          resumed / "pairs.h5", resumed / "curve.parquet", device="cpu")
    assert len(calls) == 2
    for name in ("pairs.h5", "curve.parquet"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
    assert sorted(p.name for p in resumed.iterdir()) == ["curve.parquet", "pairs.h5"]


def _phased_copy(src, dst, labels, lrs):
    """A copy of the pair set at src whose pairs are in the phases `labels`, with lrs."""
    import shutil

    import h5py

    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.create_dataset("phases", data=np.asarray(labels, dtype=np.int64))
        f.attrs["phase_lr_image"] = np.asarray([lr[0] for lr in lrs], dtype=np.float64)
        f.attrs["phase_lr_text"] = np.asarray([lr[1] for lr in lrs], dtype=np.float64)
    return dst


def test_evaluate_trains_on_the_phases_in_order_each_with_its_own_lrs(store, tmp_path):
    from vldd.stages.select_coreset import select_coreset

    plain = tmp_path / "plain.h5"
    select_coreset(store / "data", store / "emb.h5", MODEL, "random", 8, 0, plain)
    ev = {**EVAL, "epochs": 3, "batch_size": 4}
    one = _phased_copy(plain, tmp_path / "one.h5", [0] * 8, [[0.1, 0.1]])
    two = _phased_copy(plain, tmp_path / "two.h5", [1, 0, 1, 0, 1, 0, 1, 1],
                       [[0.3, 0.05], [0.1, 0.2]])
    got = {}
    for name, path in (("plain", plain), ("one", one), ("two", two)):
        evaluate(store / "data", store / "emb.h5", path, MODEL, ev, 0,
                 tmp_path / f"{name}.parquet", device="cpu")
        got[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    # a set whose pairs are all one phase trains as a set without phases (coreset lr 0.1)
    pd.testing.assert_frame_equal(got["one"], got["plain"], check_exact=True)
    # two phases: phase 0's pairs with its lrs, then phase 1's with its own, by hand
    ps = read_pairset(two)
    model = build_model(config.section("model", MODEL).as_dict(), ps.texts.shape[1], 0)
    feats = trunk_features(model.tower, ps.images, "cpu", normalized=True)
    for i, ids in enumerate([[1, 3, 5], [0, 2, 4, 6, 7]]):
        ids = torch.as_tensor(ids)
        train_contrastive(model, feats, torch.as_tensor(ps.texts), ids, ids, epochs=3,
                          lr_image=float(ps.phase_lrs[i][0]), lr_text=float(ps.phase_lrs[i][1]),
                          momentum=0.9, weight_decay=5e-4, batch_size=4,
                          logit_scale=logit_scale(MODEL), seed=phases.phase_seed(0, i))
    prepared = load_prepared(store / "data")
    emb = load_embeddings(store / "emb.h5", store / "data", MODEL["text_encoder"])
    want = RealData(prepared, emb, model, "test", "cpu").recall(model)
    values = dict(zip(got["two"]["metric"], got["two"]["value"]))
    assert values == pytest.approx(want, abs=0)
    assert int(got["two"]["epoch"].iloc[0]) == 6


def test_the_workflow_plans_the_shortcuts_of_every_phases_window(tmp_path):
    extra = tmp_path / "phases.yaml"
    extra.write_text(yaml.safe_dump({"distill": {"method": "ptmst", "phases": [
        {"share": 1, "shortcut": [0, 3]}, {"share": 1, "shortcut": [1, 3]},
        {"share": 1}]}}))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(TINY), str(extra))
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["shortcut_expert"] == 4 and counts["distill"] == 1
    for folder in ("shortcut_0_3/", "shortcut_1_3/", ""):
        assert f"experts/tiny-model/{folder}expert_1.h5" in text
