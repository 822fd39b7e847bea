"""The distillation's outer optimisation: optimiser of the data and lrs, lr parametrisation,
segments averaged per iteration, and the per-iteration diagnostics of the curve."""
from __future__ import annotations

from vldd.checkpoint import load_distiller, save_distiller  # noqa: F401
import math

import numpy as np
import pandas as pd
import pytest
import torch

from vldd.stages.distill import CURVE_COLUMNS, Distiller, checkpoint_key, distill

from conftest import DISTILL, MODEL  # the `store` fixture: conftest

ROBUST = {"optimizer": "adam", "lr_space": "log", "segments": 2, "lr_image": 0.05,
          "lr_text": 0.05, "lr_lr": 0.01}


def _distiller(store, **over):
    return Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL,
                     {**DISTILL, **over}, 6, "cpu")


def _run(store, out, cfg):
    out.mkdir(parents=True, exist_ok=True)
    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, cfg, 6,
            out / "pairs.h5", out / "curve.parquet", device="cpu")


def test_adam_log_lrs_and_segments_resume_from_a_checkpoint_to_identical_bytes(store, tmp_path):
    """Adam's moments, the log lrs and the segment draws all survive a checkpoint."""
    cfg = {**DISTILL, **ROBUST}
    _run(store, tmp_path / "straight", cfg)
    part = tmp_path / "resumed"
    part.mkdir()
    d = _distiller(store, **ROBUST)
    d.iterate()
    d.iterate()
    save_distiller(d, part / "pairs.h5.ckpt.h5",
                      checkpoint_key(MODEL, cfg, 6, [store / "expert_0.h5"]))
    _run(store, part, cfg)
    for name in ("pairs.h5", "curve.parquet"):
        assert (part / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_log_lrs_step_by_lr_times_the_linear_gradient_and_stay_positive(store):
    """With lr_space log, SGD without momentum moves log(lr) by -lr_lr * lr * dL/dlr, where
    dL/dlr is the gradient that the linear parametrisation gets from the same iteration."""
    plain = {"lr_min": None, "momentum": 0.0, "lr_lr": 0.5}
    lr0 = DISTILL["lr_init"]
    lin = _distiller(store, **plain)      # (each Distiller seeds the global dropout rng)
    lin.iterate()
    log_ = _distiller(store, lr_space="log", **plain)
    log_.iterate()
    g_lin = [(lr0 - float(lin.lr_params[i].detach())) / plain["lr_lr"] for i in range(2)]
    for i, lr in enumerate((log_.lr_img, log_.lr_txt)):
        expect = math.log(lr0) - plain["lr_lr"] * lr0 * g_lin[i]
        assert float(log_.lr_params[i].detach()) == pytest.approx(expect, rel=1e-5, abs=1e-7)
        assert float(lr) == pytest.approx(math.exp(expect), rel=1e-5)
    # a step that would take a linear lr far below zero leaves a log lr positive
    huge = {"lr_min": None, "momentum": 0.0, "lr_lr": 10.0}
    lin, log_ = _distiller(store, **huge), _distiller(store, lr_space="log", **huge)
    for d in (lin, log_):
        for p in d.lr_params:
            p.grad = torch.tensor(1.0)
        d.optimizers[2].step()
    assert float(lin.lr_img) < 0 and float(log_.lr_img) > 0 and float(log_.lr_txt) > 0


def test_adam_bounds_each_elements_first_step_whatever_the_gradient_scale(store):
    """A meta-gradient spike moves SGD's data in proportion; Adam's first step moves every
    element by at most its lr."""
    moved = {}
    for kind in ("sgd", "adam"):
        for scale in (1.0, 1e6):
            d = _distiller(store, optimizer=kind, lr_image=0.01, lr_text=0.01)
            before = d.texts.detach().clone()
            d.texts.grad = torch.randn(d.texts.shape, generator=torch.Generator().manual_seed(0)) * scale
            d.optimizers[1].step()
            moved[kind, scale] = float((d.texts.detach() - before).abs().max())
    assert moved["adam", 1.0] <= 0.01 * (1 + 1e-5)
    assert moved["adam", 1e6] <= 0.01 * (1 + 1e-5)
    assert moved["sgd", 1e6] > 1e5 * moved["sgd", 1.0] > 0


def test_segments_average_the_meta_gradients_of_successive_segments(store):
    """segments: 2 steps with the mean of the gradients of the next two (expert, start)
    draws, in the order a single-segment run draws them."""
    plain = {"momentum": 0.0, "learn_lr": False, "max_start_epoch": 2}
    from vldd.train import train_mode

    one = _distiller(store, **plain)      # (each Distiller seeds the global dropout rng)
    train_mode(one.model)
    grads = [one._segment()[4] for _ in range(2)]
    mean_texts = (grads[0][1] + grads[1][1]) / 2
    mean_images = (grads[0][0] + grads[1][0]) / 2
    two = _distiller(store, segments=2, **plain)
    before_t, before_i = two.texts.detach().clone(), two.images.detach().clone()
    two.iterate()
    assert torch.allclose(two.texts.detach(), before_t - DISTILL["lr_text"] * mean_texts,
                          rtol=1e-5, atol=1e-7)
    assert torch.allclose(two.images.detach(), before_i - DISTILL["lr_image"] * mean_images,
                          rtol=1e-5, atol=1e-8)


def test_curve_holds_per_encoder_terms_gradient_norms_and_update_sizes(store, tmp_path):
    _run(store, tmp_path, {**DISTILL, **ROBUST, "segments": 1})
    curve = pd.read_parquet(tmp_path / "curve.parquet")
    assert list(curve.columns) == CURVE_COLUMNS
    assert np.allclose(curve["term_image"] + curve["term_text"], curve["matching_loss"],
                       rtol=1e-6)
    for col in ("grad_images", "grad_texts", "grad_lr_image", "grad_lr_text",
                "step_images", "step_texts"):
        assert (curve[col] > 0).all() and np.isfinite(curve[col]).all(), col
    assert (curve[["lr_image", "lr_text"]] > 0).all().all()


def test_select_best_saves_the_state_of_the_best_window_and_survives_a_checkpoint(store, tmp_path):
    """select best (window 1): the pair set holds the data and lrs that the iteration with the
    lowest matching loss was scored with; select last the final state."""
    one = {**ROBUST, "segments": 1}
    d = _distiller(store, **one, select="best", select_window=1)
    states = []
    for _ in range(4):
        states.append((d.images.detach().clone(), d.texts.detach().clone(),
                       float(d.lr_img), float(d.lr_txt)))
        d.iterate()
    losses = [row[1] for row in d.curve]
    best = int(np.argmin(losses))
    images, texts, lrs, _, iteration = d.chosen()
    assert iteration == best
    assert np.array_equal(images, states[best][0].numpy())
    assert np.array_equal(texts, states[best][1].numpy())
    assert lrs == [states[best][2], states[best][3]]
    ps = d.pairset()
    assert ps.attrs["selected_iteration"] == best and ps.lr_text == states[best][3]
    # the kept state is part of the checkpoint
    ckpt = tmp_path / "c.h5"
    save_distiller(d, ckpt, "k")
    again = _distiller(store, **one, select="best", select_window=1)
    assert load_distiller(again, ckpt, "k")
    assert np.array_equal(again.chosen()[0], images) and again.chosen()[2:] == (lrs, None, best)
    last = _distiller(store, **one)
    for _ in range(2):
        last.iterate()
    assert np.array_equal(last.chosen()[0], last.images.detach().numpy())
    assert last.chosen()[4] == 2


def test_clip_caps_each_meta_gradient_at_a_multiple_of_its_recent_median_norm(store):
    """distill.clip: a gradient whose norm exceeds clip x the median of its last CLIP_WINDOW
    recorded norms is scaled down to exactly that; smaller ones, and every gradient before
    CLIP_WINDOW iterations are recorded or with clip null, pass unchanged."""
    from vldd.outer import CLIP_WINDOW

    d = _distiller(store, clip=2.0)
    none = _distiller(store)
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(d.images.shape, generator=g), torch.randn(d.texts.shape, generator=g),
             torch.tensor(0.5), torch.tensor(-7.0)]
    cols = [CURVE_COLUMNS.index(c) for c in ("grad_images", "grad_texts", "grad_lr_image",
                                              "grad_lr_text")]
    medians = [float(grads[0].norm()) / 10, float(grads[1].norm()) * 2, 0.1, 1.0]
    for i in range(CLIP_WINDOW):
        row = [float(i)] * len(CURVE_COLUMNS)
        for c, m in zip(cols, medians):
            row[c] = m * (1.0 if i % 2 else 1.5) if i % 4 else m   # median m
        for run in (d, none):
            run.curve.append(tuple(row))
        if i == CLIP_WINDOW - 2:   # one row short of a full window: nothing is clipped
            early = d.clipped(grads)
            assert all(a is b for a, b in zip(early, grads))
    out = d.clipped(grads)
    assert float(out[0].norm()) == pytest.approx(2.0 * medians[0], rel=1e-6)
    assert torch.allclose(out[0] / out[0].norm(), grads[0] / grads[0].norm())
    assert out[1] is grads[1]                       # 0.5x its median: unchanged
    assert float(out[2]) == pytest.approx(0.2)      # 0.5 -> 2 x 0.1
    assert float(out[3]) == pytest.approx(-2.0)     # -7 -> -(2 x 1.0), sign kept
    assert all(a is b for a, b in zip(none.clipped(grads), grads))   # clip null


def test_ema_with_decay_0_saves_the_raw_tensors_and_an_ema_is_their_running_average(store,
                                                                                  tmp_path):
    """distill.ema: decay 0 gives the same pair set as no ema, byte for byte; decay 0.5 saves
    the average 0.5^k x_0 + ... of the iterates (checked against one kept by hand), and a
    checkpoint carries it."""
    one = {**ROBUST, "segments": 1}
    runs = {}
    for ema in (None, 0.0, 0.5):    # one after the other: dropout uses the global generator
        d = runs[ema] = _distiller(store, **one, ema=ema)
        avg = d.images.detach().clone()
        for _ in range(3):
            d.iterate()
            avg = 0.5 * avg + 0.5 * d.images.detach()
    plain, zero, half = runs[None], runs[0.0], runs[0.5]
    a, b = plain.pairset(), zero.pairset()
    assert np.array_equal(a.images, b.images) and np.array_equal(a.texts, b.texts)
    assert (a.lr_image, a.lr_text) == (b.lr_image, b.lr_text)
    h = half.pairset()
    assert np.allclose(h.images, avg.numpy(), rtol=1e-6, atol=1e-7)
    assert not np.allclose(h.images, half.images.detach().numpy())
    ckpt = tmp_path / "c.h5"
    save_distiller(half, ckpt, "k")
    again = _distiller(store, **one, ema=0.5)
    assert load_distiller(again, ckpt, "k")
    assert np.array_equal(again.pairset().images, h.images)
    assert np.array_equal(again.pairset().texts, h.texts)
