"""CovMatch (distill.method covmatch): the cross-covariance loss against hand-computed values,
its gradient lowering it, a run without experts whose pair set evaluates with evaluate.lr,
and resume to identical bytes across a reset of the online model."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from vldd.covmatch import covmatch_loss, cross_covariance
from vldd.pairset import read_pairset
from vldd.stages.distill import Distiller
from vldd.stages.evaluate import evaluate

from conftest import DISTILL, EVAL, MODEL, straight_and_resumed  # and `store`

COVMATCH = {**DISTILL, "method": "covmatch", "optimizer": "adam", "lr_image": 0.01,
            "lr_text": 0.01, "covmatch": {"features": "joint", "real_batch": 16,
                                          "reset_every": 3}}


def test_cross_covariance_and_loss_against_hand_computed_values():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    txt = torch.tensor([[2.0, 0.0], [0.0, 0.0], [1.0, 3.0]])
    # means (2/3, 2/3) and (1, 1); C = (1/3) sum_i (img_i - mu)(txt_i - mu)^T
    expected = np.zeros((2, 2))
    for a, b in zip(img.numpy(), txt.numpy()):
        expected += np.outer(a - [2 / 3, 2 / 3], b - [1, 1]) / 3
    assert np.allclose(cross_covariance(img, txt).numpy(), expected, atol=1e-7)
    assert np.allclose(expected, [[1 / 3, 1 / 3], [-1 / 3, 1 / 3]], atol=1e-7)
    # the loss normalises the rows first: a rescaled set has the same statistics
    real = (img, txt[[0, 2, 2]])
    assert float(covmatch_loss(real, (3 * real[0], 0.5 * real[1]), 1.0)) == pytest.approx(0)
    syn = (img[[0, 1]], txt[[0, 2]])
    n = [torch.nn.functional.normalize(x, dim=-1) for x in (*real, *syn)]
    cov = (cross_covariance(n[0], n[1]) - cross_covariance(n[2], n[3])).pow(2).sum()
    means = sum((a.mean(0) - b.mean(0)).pow(2).sum() for a, b in ((n[0], n[2]), (n[1], n[3])))
    terms = {}
    value = covmatch_loss(real, syn, 0.5, terms)
    assert float(value) == pytest.approx(float(cov + 0.5 * means), rel=1e-6)
    assert float(terms["covariance"]) == pytest.approx(float(cov), rel=1e-6)
    assert float(cov) > 0 and float(means) > 0


def test_the_gradient_of_the_loss_lowers_it():
    gen = torch.Generator().manual_seed(0)
    real = (torch.randn(64, 8, generator=gen), torch.randn(64, 8, generator=gen))
    real = (real[0], real[0] @ torch.randn(8, 8, generator=gen) + 0.3 * real[1])
    syn = [torch.randn(10, 8, generator=gen).requires_grad_(True) for _ in range(2)]
    opt = torch.optim.Adam(syn, lr=0.05)
    first = float(covmatch_loss(real, syn, 1.0).detach())
    for _ in range(200):
        opt.zero_grad()
        covmatch_loss(real, syn, 1.0).backward()
        opt.step()
    assert float(covmatch_loss(real, syn, 1.0).detach()) < 0.1 * first


def test_covmatch_reads_no_experts_and_its_online_model_trains_and_restarts(store):
    d = Distiller(store / "data", store / "emb.h5", [], MODEL,
                  {**COVMATCH, "covmatch": {"features": "joint", "real_batch": 16,
                                            "reset_every": 2}}, 6, "cpu")
    assert d.experts == []
    head = lambda: d.covmatch.model.head.projection.weight.detach().clone()  # noqa: E731
    w0 = head()
    d.iterate()
    w1 = head()
    assert not torch.equal(w0, w1)                 # one online SGD step on real pairs
    d.iterate()
    d.iterate()                                    # iteration 2: model 1, a fresh start
    assert d.covmatch.resets == 1
    assert [row[4] for row in d.curve] == [0, 0, 1]     # the curve's "expert": the model
    assert not torch.equal(head(), w1)
    texts_before = d.init_texts
    assert not torch.equal(d.texts.detach(), texts_before)      # the texts learned
    # features encoder: the statistics do not depend on the model, which stays as built
    e = Distiller(store / "data", store / "emb.h5", [], MODEL,
                  {**COVMATCH, "covmatch": {"features": "encoder", "real_batch": 16,
                                            "reset_every": 2}}, 6, "cpu")
    w0 = e.covmatch.model.head.projection.weight.detach().clone()
    for _ in range(3):
        e.iterate()
    assert torch.equal(e.covmatch.model.head.projection.weight, w0) and e.covmatch.resets == 0
    assert not torch.equal(e.texts.detach(), e.init_texts)


def test_covmatch_pair_set_evaluates_with_evaluate_lr_and_resumes_to_identical_bytes(
        store, tmp_path):
    """Four iterations with the online model restarted after the third: a run resumed from
    the checkpoint of iteration 2 (the model after two online steps, its optimiser and the
    batch generator saved) writes the same bytes as the straight one."""
    cfg = {**COVMATCH, "select": "best", "select_window": 1,
           "covmatch": {"features": "joint", "real_batch": 16, "reset_every": 3}}
    straight, resumed = straight_and_resumed(store, [], MODEL, cfg, 6, tmp_path)
    for name in ("pairs.h5", "curve.parquet"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
    ps = read_pairset(straight / "pairs.h5")
    assert ps.method == "covmatch" and len(ps.images) == 6 and ps.similarity is None
    assert np.isnan(ps.lr_image) and np.isnan(ps.lr_text)     # it learns no lrs
    out = tmp_path / "eval.parquet"
    evaluate(store / "data", store / "emb.h5", straight / "pairs.h5", MODEL,
             {**EVAL, "lr": 0.07}, 0, out, dataset="t", device="cpu")
    table = pd.read_parquet(out)
    assert set(table["method"]) == {"distilled-covmatch"} and table["value"].notna().all()
    assert set(table["lr_image"]) == {0.07} and set(table["lr_text"]) == {0.07}


def test_encoder_features_need_a_frozen_trunk(store):
    from vldd.errors import VlddError

    model = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "trainable": "all"}}
    with pytest.raises(VlddError, match="features: joint"):
        Distiller(store / "data", store / "emb.h5", [], model,
                  {**COVMATCH, "covmatch": {"features": "encoder"}}, 6, "cpu")


def test_a_covmatch_distillation_plans_without_experts(tmp_path):
    """The distill job of covmatch reads no expert (and with random coresets nothing trains
    one); its variants and other methods' jobs still do."""
    import yaml

    from test_workflow import TINY, job_counts, snakemake

    extra = tmp_path / "covmatch.yaml"
    extra.write_text(yaml.safe_dump({"distill": {"method": "covmatch",
                                                 "variants": {"s1": {"seed": 1}}}}))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(TINY), str(extra))
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["distill"] == 2 and "train_expert" not in counts
    assert "distilled/tiny-model/covmatch_s1/n8/pairs.h5" in text
    assert "--experts  --budget" in text and "expert_0.h5" not in text
