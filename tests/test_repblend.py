"""RepBlend (distill.method repblend, model.image_encoder.trainable heads): representation
blending in the student's steps, the image projection head on a frozen encoder, the engines'
agreement with blending, and resume."""
from __future__ import annotations

import pytest
import torch

from vldd.encoders import ProjectionHead
from vldd.engines import Unroll, meta_gradient
from vldd.engines.inner import blend, draw_blend
from vldd.model import build_model
from vldd.pairset import read_pairset
from vldd.stages.distill import Distiller, distill
from vldd.stages.evaluate import evaluate
from vldd.stages.train_expert import train_expert
from vldd.trajectory import Trajectory

from conftest import DISTILL, EVAL, EXPERTS, MODEL, straight_and_resumed  # and `store`

HEADS = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "trainable": "heads"}}
REPBLEND = {**DISTILL, "method": "repblend", "lors": {"rank": 2, "alpha": 1.0, "lr_sim": 0.5},
            "repblend": {"alpha": 1.0}}


def test_blending_with_lambda_1_is_the_identity_and_with_0_the_permutation():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(5, 3, 2, 2, generator=gen), torch.randn(5, 4, generator=gen)
    perm = torch.tensor([3, 0, 4, 1, 2])
    bx, by = blend(x, y, torch.tensor(1.0), perm)
    assert torch.equal(bx, x) and torch.equal(by, y)
    bx, by = blend(x, y, torch.tensor(0.0), perm)
    assert torch.equal(bx, x[perm]) and torch.equal(by, y[perm])
    bx, by = blend(x, y, torch.tensor(0.25), perm)       # one lambda and one permutation
    assert torch.allclose(bx[1], 0.25 * x[1] + 0.75 * x[0])
    assert torch.allclose(by[1], 0.25 * y[1] + 0.75 * y[0])


def test_blend_draws_lambda_from_beta_and_replays_from_the_generator_state():
    torch.manual_seed(5)
    lams = torch.stack([draw_blend(4, 1.0, "cpu")[0] for _ in range(4000)])
    assert 0 <= float(lams.min()) and float(lams.max()) <= 1
    assert float(lams.mean()) == pytest.approx(0.5, abs=0.02)        # Beta(1, 1): uniform
    assert float(lams.var()) == pytest.approx(1 / 12, abs=0.01)
    torch.manual_seed(5)
    lams_peaked = torch.stack([draw_blend(4, 20.0, "cpu")[0] for _ in range(2000)])
    assert float(lams_peaked.var()) < 0.01                             # Beta(20, 20)
    state = torch.get_rng_state()
    a = draw_blend(6, 1.0, "cpu")
    torch.set_rng_state(state)
    b = draw_blend(6, 1.0, "cpu")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_trainable_heads_freezes_the_encoder_and_trains_an_image_projection_head():
    model = build_model(HEADS, 384, seed=3)
    tower = model.tower
    assert isinstance(tower.tail, ProjectionHead)
    assert not any(p.requires_grad for p in tower.trunk.parameters())
    width = tower.num_features
    assert tower.tail.projection.weight.shape == (width, width)
    n_head = sum(p.numel() for p in tower.tail.parameters())
    assert model.layouts()["image"].size == n_head
    again = build_model(HEADS, 384, seed=3)
    other = build_model(HEADS, 384, seed=4)
    w = tower.tail.projection.weight
    assert torch.equal(again.tower.tail.projection.weight, w)
    assert not torch.equal(other.tower.tail.projection.weight, w)
    # the image head draws from its own stream: the text head is the one of any trainable
    plain = build_model(MODEL, 384, seed=3)
    assert torch.equal(plain.head.projection.weight, model.head.projection.weight)
    x = torch.rand(2, 3, 32, 32)
    assert tower.tail(tower.trunk(x)).shape == (2, width)


@pytest.fixture(scope="module")
def heads_expert(store, tmp_path_factory):
    path = tmp_path_factory.mktemp("heads") / "expert_0.h5"
    train_expert(store / "data", store / "emb.h5", HEADS, EXPERTS, 0, path, device="cpu")
    return path


def test_a_heads_expert_records_only_the_two_heads(store, heads_expert):
    model = build_model(HEADS, 384, seed=0)
    t = Trajectory(heads_expert)
    first, last = t.rows("image", 0, int(EXPERTS["epochs"]))
    assert first.numel() == model.layouts()["image"].size
    assert not torch.equal(first, last)       # the image head trained


def test_engines_agree_on_the_meta_gradient_with_blending(store, heads_expert):
    """exact (BPTT) and checkpointed (adjoint, which replays each step's lambda, permutation
    and dropout from the recorded generator state) give the same gradients with blending on;
    blending changes them."""
    d = Distiller(store / "data", store / "emb.h5", [heads_expert], HEADS,
                  {**REPBLEND, "syn_steps": 3}, 7, "cpu")
    with torch.no_grad():
        d.similarity.params[2].normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    rows = {g: d.experts[0].rows(g, 1, 2) for g in ("image", "text")}
    grads = {}
    for engine, alpha in (("exact", 1.0), ("checkpointed", 1.0), ("exact", None)):
        u = Unroll(d.model, d.layouts, {g: rows[g][0] for g in rows},
                   {g: rows[g][1] for g in rows}, syn_steps=3, mini_batch=4, scale=14.0,
                   gen=torch.Generator().manual_seed(0), similarity=d.similarity, blend=alpha)
        torch.manual_seed(0)
        d.model.tail.train()     # dropout on: its masks are replayed too
        d.model.head.train()
        lrs = [torch.tensor(0.05, requires_grad=True) for _ in range(2)]
        _, g = meta_gradient(engine, u, d.images, d.texts, *lrs)
        grads[engine, alpha] = torch.cat([t.flatten() for t in g if t is not None])
    ref = grads["exact", 1.0]
    assert ref.norm() > 0
    assert torch.allclose(grads["checkpointed", 1.0], ref, rtol=1e-4,
                          atol=1e-6 * float(ref.norm()))
    assert not torch.allclose(grads["exact", None], ref, rtol=1e-3)


def _run(store, expert, out, cfg, budget=7):
    out.mkdir(parents=True, exist_ok=True)
    distill(store / "data", store / "emb.h5", [expert], HEADS, cfg, budget,
            out / "pairs.h5", out / "curve.parquet", device="cpu")


def test_repblend_stores_its_similarity_evaluates_and_resumes_to_identical_bytes(
        store, heads_expert, tmp_path):
    cfg = {**REPBLEND, "select": "best", "select_window": 1}
    straight, resumed = straight_and_resumed(store, [heads_expert], HEADS, cfg, 7, tmp_path)
    ps = read_pairset(straight / "pairs.h5")
    assert ps.method == "repblend" and ps.budget == 7 and len(ps.images) == 6
    assert ps.loss == "wbce"
    for name in ("pairs.h5", "curve.parquet"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
    # evaluation trains the two heads on the frozen encoder, with the set's S
    out = tmp_path / "eval.parquet"
    evaluate(store / "data", store / "emb.h5", straight / "pairs.h5", HEADS, EVAL,
             0, out, dataset="t", device="cpu")
    import pandas as pd
    table = pd.read_parquet(out)
    assert set(table["method"]) == {"distilled-repblend"} and table["value"].notna().all()


def test_repblend_is_lors_with_blending(store, heads_expert, tmp_path):
    """The same run as lors (same S, same draws of experts and batches) but for blending:
    the same initial pairs, other learned ones. (The texts: on the store's 16 px images the
    frozen Lite0's pooled features are all zero, so no pixel gradient reaches them here.)"""
    sets = {}
    for method in ("repblend", "lors"):
        _run(store, heads_expert, tmp_path / method, {**REPBLEND, "method": method})
        sets[method] = read_pairset(tmp_path / method / "pairs.h5")
    assert sets["lors"].budget == sets["repblend"].budget == 7
    assert (sets["lors"].caption_ids == sets["repblend"].caption_ids).all()
    assert not (sets["lors"].texts == sets["repblend"].texts).all()
