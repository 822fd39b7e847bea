"""Tests for vldd.losses.contrastive_loss (symmetric InfoNCE) and TextHead (its layer
structure and dropout placement), against hand computations."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vldd.encoders import TextHead
from vldd.losses import contrastive_loss


def _hand_infonce(img, txt, scale):
    """0.5 * (CE(logits, arange) + CE(logits.T, arange)), logits = scale * cos, in numpy."""
    a = img.detach().double().numpy()
    b = txt.detach().double().numpy()
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = scale * a @ b.T
    n = len(logits)

    def ce(lg):  # mean over rows of -log softmax(row)[i]
        return float(np.mean([math.log(np.exp(lg[i]).sum()) - lg[i, i] for i in range(n)]))

    return 0.5 * (ce(logits) + ce(logits.T))


@pytest.mark.parametrize("seed,n,d,scale", [(0, 4, 3, 1.0), (1, 6, 8, 5.0), (2, 5, 2, 14.3)])
def test_loss_equals_hand_symmetric_infonce(seed, n, d, scale):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(n, d, generator=g, dtype=torch.float64)
    txt = torch.randn(n, d, generator=g, dtype=torch.float64)
    got = float(contrastive_loss(img, txt, scale))
    assert got == pytest.approx(_hand_infonce(img, txt, scale), rel=1e-10, abs=1e-12)


def test_loss_is_symmetric_but_not_one_directional():
    # Symmetric in (img, txt); differs from either single-direction cross-entropy alone.
    g = torch.Generator().manual_seed(3)
    img = torch.randn(5, 4, generator=g, dtype=torch.float64)
    txt = torch.randn(5, 4, generator=g, dtype=torch.float64)
    loss = contrastive_loss(img, txt, 3.0)
    assert float(loss) == pytest.approx(float(contrastive_loss(txt, img, 3.0)), rel=1e-12)
    logits = 3.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    one_way = F.cross_entropy(logits, torch.arange(5))
    assert abs(float(loss) - float(one_way)) > 1e-3


def test_loss_invariant_to_feature_norms():
    g = torch.Generator().manual_seed(4)
    img = torch.randn(6, 5, generator=g, dtype=torch.float64)
    txt = torch.randn(6, 5, generator=g, dtype=torch.float64)
    a = torch.rand(6, 1, generator=g, dtype=torch.float64) * 50 + 0.01
    b = torch.rand(6, 1, generator=g, dtype=torch.float64) * 50 + 0.01
    base = float(contrastive_loss(img, txt, 7.0))
    assert float(contrastive_loss(img * a, txt * b, 7.0)) == pytest.approx(base, rel=1e-10)
    # ...but not to the direction: flipping one text's sign changes it
    flipped = txt.clone()
    flipped[0] = -flipped[0]
    assert abs(float(contrastive_loss(img, flipped, 7.0)) - base) > 1e-3


def test_aligned_well_separated_pairs_with_large_scale_give_near_zero_loss():
    img = torch.eye(4, dtype=torch.float64) * 3.0
    txt = torch.eye(4, dtype=torch.float64) * 0.2
    assert float(contrastive_loss(img, txt, 100.0)) < 1e-30
    # with a small scale the same pairs are far from zero (the scale multiplies the cosines)
    assert float(contrastive_loss(img, txt, 1.0)) > 0.5


def test_swapping_two_texts_increases_the_loss():
    g = torch.Generator().manual_seed(5)
    img = torch.randn(5, 6, generator=g, dtype=torch.float64)
    txt = img + 0.1 * torch.randn(5, 6, generator=g, dtype=torch.float64)
    swapped = txt[[1, 0, 2, 3, 4]]
    base = float(contrastive_loss(img, txt, 10.0))
    assert float(contrastive_loss(img, swapped, 10.0)) > base + 0.3   # 0.09 -> 0.67


def test_loss_is_differentiable_wrt_both_inputs():
    g = torch.Generator().manual_seed(6)
    img = torch.randn(4, 3, generator=g, requires_grad=True)
    txt = torch.randn(4, 3, generator=g, requires_grad=True)
    contrastive_loss(img, txt, 5.0).backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert txt.grad is not None and txt.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- TextHead

def _randomised_head(d_in, d_out, dropout, seed=0):
    torch.manual_seed(seed)
    head = TextHead(d_in, d_out, dropout=dropout).double()
    with torch.no_grad():  # non-trivial LayerNorm affine so its use is checked too
        head.layer_norm.weight.uniform_(0.5, 1.5)
        head.layer_norm.bias.uniform_(-0.5, 0.5)
    return head


def _manual_head(head, x, drop_residual=False):
    W1, b1 = head.projection.weight, head.projection.bias
    W2, b2 = head.fc.weight, head.fc.bias
    p = x @ W1.T + b1
    gelu = 0.5 * p * (1.0 + torch.erf(p / math.sqrt(2.0)))
    h = gelu @ W2.T + b2
    z = p if drop_residual else p + h
    mu = z.mean(-1, keepdim=True)
    var = ((z - mu) ** 2).mean(-1, keepdim=True)
    eps = head.layer_norm.eps
    return (z - mu) / torch.sqrt(var + eps) * head.layer_norm.weight + head.layer_norm.bias


def test_text_head_output_shape():
    head = TextHead(7, 5)
    out = head(torch.randn(3, 7))
    assert out.shape == (3, 5)
    assert head.projection.in_features == 7 and head.projection.out_features == 5
    assert head.fc.in_features == 5 and head.fc.out_features == 5


def test_text_head_matches_manual_computation_in_eval_mode():
    head = _randomised_head(6, 4, dropout=0.5).eval()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        got = head(x)
        want = _manual_head(head, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_text_head_dropout_only_on_residual_branch():
    # With dropout p=1 in training mode the fc branch is zeroed entirely, leaving
    # LayerNorm(projection(x)): dropout sits on the branch, not on p or the output.
    head = _randomised_head(6, 4, dropout=1.0).train()
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    with torch.no_grad():
        got = head(x)
        torch.testing.assert_close(got, _manual_head(head, x, drop_residual=True),
                                   rtol=1e-10, atol=1e-10)
        # and the branch does matter in eval mode
        assert (head.eval()(x) - got).abs().max() > 1e-3


def test_text_head_dropout_is_active_in_train_mode_only():
    head = _randomised_head(6, 16, dropout=0.5)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    with torch.no_grad():
        ev1, ev2 = head.eval()(x), head(x)
        torch.manual_seed(0)
        tr = head.train()(x)
    torch.testing.assert_close(ev1, ev2)
    assert (tr - ev1).abs().max() > 1e-3
