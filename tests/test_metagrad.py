"""Tests for vldd.engines.unroll / matching_loss: the exact meta-gradient of the distillation
loss w.r.t. the distilled image features, the distilled texts and the two learnable lrs,
checked against central finite differences on a tiny float64 student."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from vldd import trajectory
from vldd.encoders import ImageTower, TextHead
from vldd.engines import Unroll, unroll
from vldd.losses import matching_loss
from vldd.model import DualEncoder

N, SYN_STEPS, MINI_BATCH, SCALE = 6, 3, 4, 5.0


def _tiny_model():
    torch.manual_seed(0)
    tower = ImageTower(trunk=nn.Identity(),
                       tail=nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.Tanh(),
                                          nn.Linear(6, 6)),
                       num_features=6, mean=(0.5,) * 3, std=(0.5,) * 3)
    tower.tail.double()
    return DualEncoder(tower, TextHead(5, 6, dropout=0.0).double())


def _flat(module):
    return trajectory.flatten(module.parameters()).double()


def _setup(model, seed=1, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    theta0 = {"image": _flat(model.tail), "text": _flat(model.head)}
    target = {k: v + shift * torch.randn(v.shape, generator=g, dtype=torch.float64)
              for k, v in theta0.items()}
    feats = torch.randn(N, 3, 2, 2, generator=g, dtype=torch.float64)
    texts = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return theta0, target, feats, texts


def _loss(model, theta0, target, feats, texts, lr_img, lr_txt, syn_steps=SYN_STEPS):
    layouts = model.layouts()
    u = Unroll(model, layouts, theta0, target, syn_steps=syn_steps, mini_batch=MINI_BATCH,
               scale=SCALE, gen=torch.Generator().manual_seed(0))
    end = unroll(u, feats, texts, lr_img, lr_txt)
    return matching_loss(end, theta0, target)


def _rel_err(a, b):
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def _pick(numel, k, seed):
    return torch.randperm(numel, generator=torch.Generator().manual_seed(seed))[:k].tolist()


@pytest.fixture(scope="module")
def problem():
    model = _tiny_model()
    theta0, target, feats, texts = _setup(model)
    lr_img = torch.tensor(0.4, dtype=torch.float64)
    lr_txt = torch.tensor(0.3, dtype=torch.float64)
    # exact meta-gradient
    leaves = [t.clone().requires_grad_(True) for t in (feats, texts, lr_img, lr_txt)]
    loss = _loss(model, theta0, target, *leaves)
    grads = torch.autograd.grad(loss, leaves)
    return model, theta0, target, (feats, texts, lr_img, lr_txt), grads, float(loss.detach())


def _fd(problem, which, coord, eps=1e-6):
    model, theta0, target, inputs, _, _ = problem

    def at(delta):
        args = [t.clone() for t in inputs]
        args[which].view(-1)[coord] += delta
        with torch.enable_grad():
            return float(_loss(model, theta0, target, *args).detach())

    return (at(eps) - at(-eps)) / (2 * eps)


def test_loss_is_finite_and_not_trivial(problem):
    _, _, _, _, grads, loss = problem
    assert 0.0 < loss < 10.0
    assert loss != pytest.approx(2.0, abs=1e-3)   # the steps moved the student
    for g in grads:
        assert torch.isfinite(g).all()
        assert g.abs().max() > 1e-6


@pytest.mark.parametrize("which,name", [(0, "image features"), (1, "texts")])
def test_meta_gradient_wrt_distilled_data_matches_finite_differences(problem, which, name):
    grads = problem[4]
    g = grads[which].reshape(-1)
    coords = _pick(g.numel(), 6, seed=10 + which)
    # include the coordinate with the largest gradient, which certainly matters
    coords.append(int(g.abs().argmax()))
    for c in coords:
        fd = _fd(problem, which, c)
        exact = float(g[c])
        if abs(exact) < 1e-7 and abs(fd) < 1e-7:
            continue  # a pixel no mini-batch saw: both are zero
        assert _rel_err(exact, fd) < 1e-4, (name, c, exact, fd)


@pytest.mark.parametrize("which,name", [(2, "lr_img"), (3, "lr_txt")])
def test_meta_gradient_wrt_learnable_lrs_matches_finite_differences(problem, which, name):
    exact = float(problem[4][which])
    fd = _fd(problem, which, 0)
    assert abs(exact) > 1e-6
    assert _rel_err(exact, fd) < 1e-4, (name, exact, fd)


def test_zero_steps_gives_one_per_nonempty_group():
    model = _tiny_model()
    theta0, target, feats, texts = _setup(model)
    loss = _loss(model, theta0, target, feats, texts, torch.tensor(0.4, dtype=torch.float64),
                 torch.tensor(0.3, dtype=torch.float64), syn_steps=0)
    assert float(loss.detach()) == pytest.approx(2.0, abs=1e-12)
    assert float(matching_loss(theta0, theta0, target)) == pytest.approx(2.0, abs=1e-12)


def test_matching_loss_is_normalised_squared_distance():
    start = {"image": torch.tensor([0.0, 0.0]), "text": torch.tensor([1.0])}
    target = {"image": torch.tensor([3.0, 4.0]), "text": torch.tensor([3.0])}
    end = {"image": torch.tensor([3.0, 1.0]), "text": torch.tensor([2.0])}
    # image: |(0,-3)|^2 / |(-3,-4)|^2 = 9/25; text: 1/4
    assert float(matching_loss(end, start, target)) == pytest.approx(9 / 25 + 1 / 4)


def _empty_image_group_model():
    torch.manual_seed(0)
    tower = ImageTower(trunk=nn.Flatten(), tail=nn.Sequential(), num_features=12,
                       mean=(0.5,) * 3, std=(0.5,) * 3)
    return DualEncoder(tower, TextHead(5, 12, dropout=0.0).double())


def test_empty_image_group_is_skipped_and_unroll_still_runs():
    model = _empty_image_group_model()
    layouts = model.layouts()
    assert layouts["image"].size == 0
    g = torch.Generator().manual_seed(2)
    theta0 = {"image": torch.zeros(0, dtype=torch.float64), "text": _flat(model.head)}
    target = {"image": torch.zeros(0, dtype=torch.float64),
              "text": theta0["text"] + 0.3 * torch.randn(theta0["text"].shape, generator=g,
                                                         dtype=torch.float64)}
    pixels = torch.randn(N, 3, 2, 2, generator=g, dtype=torch.float64, requires_grad=True)
    texts = torch.randn(N, 5, generator=g, dtype=torch.float64, requires_grad=True)
    lr_img = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    lr_txt = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    # zero steps: only the text group counts
    assert float(matching_loss(theta0, theta0, target)) == pytest.approx(1.0, abs=1e-12)
    feats = model.tower.trunk(pixels)
    u = Unroll(model, layouts, theta0, target, syn_steps=SYN_STEPS, mini_batch=MINI_BATCH,
               scale=SCALE, gen=torch.Generator().manual_seed(0))
    end = unroll(u, feats, texts, lr_img, lr_txt)
    assert end["image"].numel() == 0
    loss = matching_loss(end, theta0, target)
    value = float(loss.detach())
    assert torch.isfinite(loss) and 0.0 < value != pytest.approx(1.0, abs=1e-6)
    g_pix, g_txt, g_lr_img, g_lr_txt = torch.autograd.grad(
        loss, [pixels, texts, lr_img, lr_txt], allow_unused=True)
    # the pixels still shape the text head's steps through the contrastive loss
    assert g_pix is not None and g_pix.abs().max() > 1e-8
    assert g_txt is not None and g_txt.abs().max() > 1e-8
    assert g_lr_txt is not None and abs(float(g_lr_txt)) > 1e-8
    assert g_lr_img is None   # nothing to step with the image lr
