"""The outer optimisation of a distillation: which method a label runs, how many pairs a
budget buys, the optimiser of each kind of distilled tensor, the curve's diagnostics, the
clipping of the meta-gradients and the moving average of the learned tensors (distill.ema)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .config import ALGORITHMS, algorithm  # noqa: F401  (re-exported)
from .errors import VlddError
from .similarity import Similarity

# the algorithms that learn a similarity matrix over the pairs (distill.lors); ptmst is LoRS's
# algorithm, its own parts are settings (distill.shortcut, distill.ema, lors.similarity full)
WITH_SIMILARITY = ("lors", "repblend", "ptmst")


def pairs_to_distil(cfg, budget: int) -> int:
    """The number of pairs a budget buys: one less for LoRS and RepBlend when S is paid for
    with a pair."""
    if algorithm(cfg.method) in WITH_SIMILARITY and cfg.lors.pay_for_similarity:
        if budget < 3:
            raise VlddError(f"distill budget {budget}: {cfg.method} with lors.pay_for_similarity "
                            "distils budget - 1 pairs and needs at least 2; choose a budget "
                            ">= 3 or set distill.lors.pay_for_similarity: false.")
        return budget - 1
    return budget


def make_optimizer(cfg, params, lr):
    """The optimiser of one kind of distilled tensor (pixels, texts or the lrs):
    distill.optimizer sgd (with distill.momentum, as the seed code) or adam (per-element
    steps of about lr whatever the gradient's scale)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(float(cfg.momentum), 0.999))
    return torch.optim.SGD(params, lr=lr, momentum=float(cfg.momentum))


def learned_similarity(cfg, n_pairs: int, device):
    """(S, its optimiser) for the algorithms that learn a similarity matrix over the pairs
    (LoRS, RepBlend, PTM-ST: the identity at the start, its own lr lors.lr_sim or lr_text);
    (None, None) for the others."""
    if algorithm(cfg.method) not in WITH_SIMILARITY:
        return None, None
    lc = cfg.lors
    sim = Similarity.identity(n_pairs, lc.similarity, lc.rank, lc.alpha, seed=cfg.seed,
                              device=device).requires_grad_(True)
    lr_sim = cfg.lr_text if lc.lr_sim is None else lc.lr_sim
    return sim, make_optimizer(cfg, sim.params, float(lr_sim))


# The curve: one row per iteration. term_*: each encoder's normalised matching term;
# grad_*: the norm of the meta-gradient of the pixels, the texts and each lr; step_*: the
# update of the pixels / texts relative to their norm.
DIAGNOSTICS = ["term_image", "term_text", "grad_images", "grad_texts", "grad_lr_image",
               "grad_lr_text", "step_images", "step_texts"]
CURVE_COLUMNS = ["iteration", "matching_loss", "lr_image", "lr_text", "expert",
                 "start_epoch"] + DIAGNOSTICS


def _norm(t):
    return float("nan") if t is None else float(t.detach().float().norm())


def diagnostics(terms, grads, before, after):
    """The DIAGNOSTICS of an iteration's curve row."""
    out = [float(terms[g]) if g in terms else float("nan") for g in ("image", "text")]
    out += [_norm(g) for g in grads]
    out += [_norm(a - b) / max(_norm(b), 1e-12) for a, b in zip(after, before)]
    return out


# distill.clip: a meta-gradient is compared with the median of its norms over this many
# previous iterations (from the curve, so a resumed run clips the same), once that many exist
CLIP_WINDOW = 20
GRAD_COLUMNS = ["grad_images", "grad_texts", "grad_lr_image", "grad_lr_text"]


def clip(grads, curve, columns, factor):
    """distill.clip: each meta-gradient (pixels, texts, each lr) scaled down to at most
    factor x the median of its norms over the last CLIP_WINDOW rows of `curve` (whose
    `columns` hold those norms); unchanged with factor None or before CLIP_WINDOW rows. A
    chaotic unroll now and then gives a meta-gradient 10-100x the usual; Adam (beta2 0.999
    lags) would take a step up to ~16x its usual size with it, undoing many iterations.
    Gradients after the four (LoRS's similarity) are not clipped."""
    if factor is None or len(curve) < CLIP_WINDOW:
        return grads
    out = list(grads)
    for i, (g, col) in enumerate(zip(grads, columns)):
        norms = [row[col] for row in curve[-CLIP_WINDOW:] if math.isfinite(row[col])]
        if g is None or not norms:
            continue
        cap, norm = float(factor) * float(np.median(norms)), float(g.norm())
        if norm > cap > 0:
            out[i] = g * (cap / norm)
    return out


class Ema:
    """distill.ema (PTM-ST): an exponential moving average of every learned tensor (pixels,
    texts, the lrs' parameters, S's parameters), updated after each step as
    shadow = decay * shadow + (1 - decay) * tensor; the saved pair set is the average, not
    the last step. With decay 0 the average is the tensors themselves."""

    def __init__(self, decay: float, tensors: dict):
        self.decay = float(decay)
        self.shadow = {k: t.detach().clone() for k, t in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: dict) -> None:
        for k, t in tensors.items():
            self.shadow[k].mul_(self.decay).add_(t.detach(), alpha=1.0 - self.decay)

    def arrays(self) -> dict:
        return {k: v.cpu().numpy().copy() for k, v in self.shadow.items()}

    @torch.no_grad()
    def load(self, arrays: dict) -> None:
        for k, v in self.shadow.items():
            v.copy_(torch.as_tensor(arrays[k]))
