"""The engines that backpropagate through the unroll's own graph: exact and heads-only."""
from __future__ import annotations

from ..losses import matching_loss
from .inner import Unroll, distilled_trunk_features, grads_of, unroll


def exact(u: Unroll, pixels, texts, lr_img, lr_txt):
    """Backpropagation through time: the trunk once on the pixels with its graph, all K steps
    with theirs, one backward pass from the matching loss."""
    feats = distilled_trunk_features(u.model, pixels, u.opts)
    end = unroll(u, feats, texts, lr_img, lr_txt)
    loss = matching_loss(end, u.theta0, u.target, terms=u.terms)
    return loss.detach(), grads_of(loss, [pixels, texts, lr_img, lr_txt, *u.leaves()])


def is_adapter_layout(layout) -> bool:
    """True when the image group holds LoRA adapters only (model.image_encoder.trainable:
    lora): heads-only unrolls those, as they are the trainable part of a frozen encoder."""
    return bool(layout.names) and all(".lora_" in f".{n}" for n in layout.names)


def heads_only(u: Unroll, pixels, texts, lr_img, lr_txt):
    """exact with the image tail held at theta0: its output on all distilled images once,
    the text head unrolled on it, the matching loss of the text head alone. The image lr
    steps nothing (its gradient is None). With LoRA adapters as the image group: exact."""
    if is_adapter_layout(u.layouts["image"]):
        return exact(u, pixels, texts, lr_img, lr_txt)
    feats = distilled_trunk_features(u.model, pixels, u.opts)
    img_f = u.image_features(u.theta0["image"], feats)
    end = unroll(u, img_f, texts, lr_img, lr_txt, step_image=False)
    loss = matching_loss(end, u.theta0, u.target, groups=("text",), terms=u.terms)
    g_pix, g_txt, _, g_lr_t, *g_sim = grads_of(loss, [pixels, texts, None, lr_txt, *u.leaves()])
    return loss.detach(), [g_pix, g_txt, None, g_lr_t, *g_sim]
