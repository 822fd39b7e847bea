"""LoRS (distill.method lors): the learned similarity matrix, its weighted BCE, its pair sets
and their evaluation, its gradients through the engines, and resume."""
from __future__ import annotations

import math
import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from vldd.engines import Unroll, meta_gradient
from vldd.losses import wbce_loss
from vldd.pairset import read_pairset
from vldd.similarity import Similarity
from vldd.stages.distill import Distiller
from vldd.stages.evaluate import evaluate

from conftest import DISTILL, EVAL, MODEL, straight_and_resumed  # and the `store` fixture

LORS = {**DISTILL, "method": "lors", "lors": {"rank": 2, "alpha": 1.0, "lr_sim": 0.5}}


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_similarity_starts_as_the_identity(kind):
    s = Similarity.identity(7, kind, rank=3, alpha=3.0, seed=1)
    assert torch.equal(s.matrix(), torch.eye(7))
    idx = torch.tensor([4, 1, 6])
    assert torch.equal(s.block(idx), torch.eye(3))
    if kind == "lowrank":   # L random, R zero: a gradient on R moves S off the identity
        a, left, right = s.params
        assert torch.equal(a, torch.ones(7)) and left.abs().sum() > 0
        assert torch.equal(right, torch.zeros(7, 3))
        right.data[0, 0] = 1.0
        assert s.matrix()[1, 0] == pytest.approx(3.0 / 3 * float(left[1, 0]))   # L[1] . R[0]


def test_wbce_against_a_hand_computed_value():
    """img (1,0), (0,1); txt (1,0), (1,1)/sqrt2; scale 2: cosines 1, 1/sqrt2 / 0, 1/sqrt2.
    Targets [[1, 0.2], [0, 0.9]]: positives (0,0), (1,1); negatives (0,1), (1,0)."""
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    targets = torch.tensor([[1.0, 0.2], [0.0, 0.9]])

    def bce(cos, t):
        p = 1 / (1 + math.exp(-2 * cos))
        return -(t * math.log(p + 1e-6) + (1 - t) * math.log(1 - p + 1e-6))

    c = 1 / math.sqrt(2)
    pos = (bce(1.0, 1.0) + bce(c, 0.9)) / 2
    neg = (bce(c, 0.2) + bce(0.0, 0.0)) / 2
    assert float(wbce_loss(img, txt, 2.0, targets)) == pytest.approx(0.5 * (pos + neg),
                                                                   rel=1e-6)


def _with_similarity(src, dst, arrays, kind="lowrank", alpha=1.0):
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        g = f.create_group("similarity")
        g.attrs["kind"], g.attrs["alpha"] = kind, alpha
        for name, arr in arrays.items():
            g.create_dataset(name, data=arr)
    return dst


def test_a_pair_set_whose_similarity_is_the_identity_evaluates_as_one_without(store, tmp_path):
    from vldd.stages.select_coreset import select_coreset

    plain = tmp_path / "plain.h5"
    select_coreset(store / "data", store / "emb.h5", MODEL, "random", 6, 0, plain)
    ident = Similarity.identity(6, "lowrank", rank=2, seed=0).arrays()
    moved = {**ident, "right": np.full((6, 2), 0.3, np.float32)}
    sets = {"plain": plain,
            "identity": _with_similarity(plain, tmp_path / "identity.h5", ident),
            "learned": _with_similarity(plain, tmp_path / "learned.h5", moved)}
    assert read_pairset(sets["identity"]).loss == "infonce"
    assert read_pairset(sets["learned"]).loss == "wbce"
    out = {}
    ev = {**EVAL, "epochs": 10, "batch_size": 6}
    for name, path in sets.items():
        evaluate(store / "data", store / "emb.h5", path, MODEL, ev, 0,
                 tmp_path / f"{name}.parquet", device="cpu")
        out[name] = pd.read_parquet(tmp_path / f"{name}.parquet")
    pd.testing.assert_frame_equal(out["identity"], out["plain"], check_exact=True)
    # (the test set of the store is too small for recall to tell WBCE from InfoNCE training:
    # the next test shows that they differ)


def test_evaluate_loss_chooses_the_loss_whatever_the_set_holds(store, tmp_path, monkeypatch):
    """evaluate.loss: auto trains a learned S with the weighted BCE and a set without S with
    InfoNCE; infonce ignores a learned S (as the same pairs without it); wbce trains a set
    without S on the identity."""
    import vldd.train
    from vldd.stages.select_coreset import select_coreset

    plain = tmp_path / "plain.h5"
    select_coreset(store / "data", store / "emb.h5", MODEL, "random", 6, 0, plain)
    moved = {**Similarity.identity(6, "lowrank", rank=2, seed=0).arrays(),
             "right": np.full((6, 2), 0.3, np.float32)}
    learned = _with_similarity(plain, tmp_path / "learned.h5", moved)
    seen = []
    real = vldd.train.wbce_loss
    monkeypatch.setattr(vldd.train, "wbce_loss",
                        lambda i, t, s, targets: seen.append(targets.clone()) or real(i, t, s, targets))
    got = {}
    for name, path, loss in (("plain", plain, "auto"), ("learned", learned, "auto"),
                             ("dropped", learned, "infonce"), ("identity", plain, "wbce")):
        seen.clear()
        evaluate(store / "data", store / "emb.h5", path, MODEL,
                 {**EVAL, "epochs": 2, "batch_size": 6, "loss": loss}, 0,
                 tmp_path / f"{name}.parquet", device="cpu")
        got[name] = (pd.read_parquet(tmp_path / f"{name}.parquet"), list(seen))
    assert got["plain"][1] == [] and got["dropped"][1] == []
    assert len(got["learned"][1]) == 2 and len(got["identity"][1]) == 2      # 1 batch x 2 epochs
    assert all(torch.equal(t, torch.eye(6)) for t in got["identity"][1])
    s = torch.as_tensor(read_pairset(learned).similarity_matrix())
    # each batch holds all 6 pairs in some order: S's entries, permuted
    assert all(torch.equal(t.flatten().sort()[0], s.flatten().sort()[0])
               for t in got["learned"][1])
    pd.testing.assert_frame_equal(got["dropped"][0], got["plain"][0], check_exact=True)


def test_training_on_the_identity_with_wbce_differs_from_infonce():
    """The weighted BCE is another loss than InfoNCE even on identity targets: evaluate must
    not use it for sets without a learned S (the test above shows it does not)."""
    from vldd.train import train_epoch

    out = []
    for targets in (None, torch.eye(4)):
        torch.manual_seed(0)
        tail, head = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
        model = type("M", (), {"tail": tail, "head": head})()
        opt = torch.optim.SGD([*tail.parameters(), *head.parameters()], lr=0.5)
        g = torch.Generator().manual_seed(1)
        feats, texts = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
        train_epoch(model, opt, torch.arange(4), feats, texts, torch.arange(4),
                    torch.arange(4), 4, 5.0, None, targets)
        out.append(torch.cat([p.detach().flatten() for p in (*tail.parameters(),
                                                              *head.parameters())]))
    assert not torch.allclose(out[0], out[1])


def test_engines_agree_on_the_similarity_gradient(store):
    """exact (BPTT) and checkpointed (adjoint) give the same gradient for S's parameters;
    constant-memory (TESLA, truncated) a correlated one."""
    d = Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL,
                  {**LORS, "syn_steps": 3}, 7, "cpu")
    assert len(d.images) == 6 and d.similarity.n == 6    # one pair pays for S
    with torch.no_grad():    # off the identity, so every term of the gradient is alive
        d.similarity.params[2].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    # (from epoch 1: at epoch 0 the pretrained tail gives all-zero features on the store's
    # tiny images, and every gradient is 0)
    rows = {g: d.experts[0].rows(g, 1, 2) for g in ("image", "text")}
    grads = {}
    for engine in ("exact", "checkpointed", "constant-memory"):
        u = Unroll(d.model, d.layouts, {g: rows[g][0] for g in rows},
                   {g: rows[g][1] for g in rows}, syn_steps=3, mini_batch=4, scale=14.0,
                   gen=torch.Generator().manual_seed(0), similarity=d.similarity)
        torch.manual_seed(0)
        d.model.tail.eval()
        d.model.head.eval()
        lrs = [torch.tensor(0.05, requires_grad=True) for _ in range(2)]
        _, g = meta_gradient(engine, u, d.images, d.texts, *lrs)
        grads[engine] = torch.cat([t.flatten() for t in g[4:]])
    ref = grads["exact"]
    assert ref.norm() > 0
    assert torch.allclose(grads["checkpointed"], ref, rtol=1e-4, atol=1e-6 * float(ref.norm()))
    assert float(torch.nn.functional.cosine_similarity(grads["constant-memory"], ref, dim=0)) > 0.5


@pytest.mark.parametrize("kind", ["lowrank", "full"])
def test_lors_learns_a_similarity_stores_it_and_resumes_to_identical_bytes(store, tmp_path, kind):
    cfg = {**LORS, "lors": {**LORS["lors"], "similarity": kind}, "select": "best",
           "select_window": 1}
    straight, resumed = straight_and_resumed(store, [store / "expert_0.h5"], MODEL, cfg, 7,
                                             tmp_path)
    ps = read_pairset(straight / "pairs.h5")
    assert ps.budget == 7 and len(ps.images) == 6 and ps.method == "lors"
    assert ps.loss == "wbce"                 # S moved off the identity
    m = ps.similarity_matrix()
    assert m.shape == (6, 6) and not np.array_equal(m, np.eye(6, dtype=np.float32))
    from test_results_layout import ARTIFACTS, check_h5    # the file is as documented
    art = next(a for a in ARTIFACTS if a.pattern.endswith("distilled/{model}/{method}/n{N}/pairs.h5"))
    check_h5(straight / "pairs.h5", art)
    for name in ("pairs.h5", "curve.parquet"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name


def test_without_paying_for_s_a_lors_set_has_budget_pairs_and_a_budget_of_2_is_refused(store):
    from vldd.errors import VlddError

    d = Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL,
                  {**LORS, "lors": {"pay_for_similarity": False}}, 6, "cpu")
    assert len(d.images) == 6 and d.similarity.n == 6
    with pytest.raises(VlddError, match="budget - 1"):
        Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, LORS, 2,
                  "cpu")


@pytest.mark.parametrize("engine", ["checkpointed", "constant-memory", "heads-only", "adam-log"])
def test_every_engine_moves_the_similarity(store, engine):
    """(adam-log: the exact engine under the default's outer optimisation: Adam, log-lrs,
    clipping)"""
    over = ({"optimizer": "adam", "lr_space": "log", "clip": 3.0, "lr_lr": 0.02}
            if engine == "adam-log" else {"engine": engine})
    d = Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL,
                  {**LORS, **over, "max_start_epoch": 2}, 7, "cpu")
    before = [p.detach().clone() for p in d.similarity.params]
    for _ in range(2):     # (start epoch 0 gives zero gradients on the store: see above)
        d.iterate()
    moved = [not torch.equal(b, p.detach()) for b, p in zip(before, d.similarity.params)]
    assert moved[2], engine          # R leaves zero: S leaves the identity
