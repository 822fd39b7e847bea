"""The method's two losses, side by side.

The inner loss (paper eq. 1): symmetric InfoNCE between the image and text features of a batch,
pair i matching pair i. Experts, students, evaluation and the coresets all train with it.
LoRS (distill.method lors) trains the students and evaluation of its pair sets with the
weighted BCE against a learned similarity block instead (vldd.similarity).

The outer loss (paper eq. 2, bi-trajectory matching): per encoder, how far the student ended
from the expert's target relative to how far its start was,
|theta_end - theta*_target|^2 / |theta*_start - theta*_target|^2, summed over the encoders.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GROUPS = ("image", "text")


def contrastive_loss(img_feat, txt_feat, logit_scale):
    """Symmetric InfoNCE on L2-normalised features; pair i of the batch matches i."""
    img = F.normalize(img_feat, dim=-1)
    txt = F.normalize(txt_feat, dim=-1)
    logits = logit_scale * img @ txt.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def wbce_loss(img_feat, txt_feat, logit_scale, targets, eps: float = 1e-6):
    """LoRS's weighted binary cross-entropy: P = sigmoid(logit_scale * cos) against the soft
    targets (a [b, b] block of S), averaged separately over the positive entries (target
    > 0.5) and the others, then halved: 0.5 * (mean_pos + mean_neg) (a kind with no entry
    adds 0)."""
    img = F.normalize(img_feat, dim=-1)
    txt = F.normalize(txt_feat, dim=-1)
    p = torch.sigmoid(logit_scale * img @ txt.t())
    bce = -(targets * torch.log(p + eps) + (1 - targets) * torch.log(1 - p + eps))
    pos = (targets > 0.5).to(bce.dtype)
    neg = 1 - pos
    return 0.5 * ((bce * pos).sum() / pos.sum().clamp(min=1)
                  + (bce * neg).sum() / neg.sum().clamp(min=1))


def matching_terms(end: dict, start: dict, target: dict, groups=GROUPS) -> dict:
    """Per encoder, |end - target|^2 / |start - target|^2 (empty encoders skipped)."""
    terms = {}
    for group in groups:
        if end[group].numel() == 0:
            continue
        num = (end[group] - target[group]).pow(2).sum()
        den = (start[group] - target[group]).pow(2).sum()
        terms[group] = num / den
    return terms


def matching_loss(end: dict, start: dict, target: dict, groups=GROUPS, terms=None):
    """Sum over encoders of |end - target|^2 / |start - target|^2 (empty encoders skipped).
    `terms`, when a dict, receives each encoder's term (detached)."""
    parts = matching_terms(end, start, target, groups)
    if terms is not None:
        terms.update({g: t.detach() for g, t in parts.items()})
    total = 0.0
    for t in parts.values():
        total = total + t
    return total
