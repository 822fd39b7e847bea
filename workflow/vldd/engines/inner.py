"""The inner loop every engine shares: the Unroll (one iteration's inner problem), its
mini-batches and step loss, and the differentiable unroll itself."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.func import functional_call

from ..config import filled
from ..losses import contrastive_loss, wbce_loss
from .fastpath import unroll_tail


@dataclass
class EngineOptions:
    """Numerics and layout. The defaults keep fp32 everywhere (the 1e-4 gradient agreement of
    the engines is checked in fp32)."""
    autocast: str = "none"        # "bf16": the frozen trunk forward in bfloat16 autocast
    tf32: bool = False            # TF32 matmuls and convolutions on CUDA
    channels_last: bool = True    # channels_last trunk and pixels on CUDA (ignored on CPU)
    segment: int | None = None    # checkpointed: steps per snapshot (None: ceil(sqrt(K)))

    @classmethod
    def from_config(cls, cfg):
        """From distill settings (a typed section or a dict; missing keys: the schema's)."""
        cfg = filled("distill", cfg)
        seg = cfg["segment_steps"]
        return cls(autocast=str(cfg["autocast"]), tf32=bool(cfg["tf32"]),
                   channels_last=bool(cfg["channels_last"]),
                   segment=None if seg is None else int(seg))


@dataclass
class Unroll:
    """One iteration's inner problem: everything an engine needs besides the learnable leaves
    (pixels, texts, lr_img, lr_txt).

    The student `model` (its trainable groups laid out flat by `layouts`) starts at `theta0`
    and is scored against `target`, flat expert parameters per group ("image" = the tail,
    "text" = the head). It takes `syn_steps` SGD steps, each on `mini_batch` distilled pairs
    drawn from `gen` (None: every step on all pairs, in order), on the contrastive loss at
    logit scale `scale`. `opts`: numerics and layout. `terms`, when a dict, receives each
    encoder's normalised term of the matching loss. `similarity` (LoRS, vldd.similarity):
    the steps train on the weighted BCE against its blocks instead, and the engines return
    the gradients of its parameters after the four others. `blend` (RepBlend): every step
    blends its batch's trunk features and texts with a permutation of themselves, lambda ~
    Beta(blend, blend) (drawn, like dropout, from the default generator, so the recomputing
    engines replay it).
    """
    model: nn.Module
    layouts: dict
    theta0: dict
    target: dict
    syn_steps: int
    mini_batch: int | None
    scale: float
    gen: torch.Generator | None
    opts: EngineOptions = field(default_factory=EngineOptions)
    terms: dict | None = None
    similarity: object | None = None
    blend: float | None = None

    def leaves(self):
        """The learnable leaves besides pixels, texts and lrs (LoRS's similarity)."""
        return [] if self.similarity is None else list(self.similarity.params)

    def __post_init__(self):
        self.syn_steps = int(self.syn_steps)
        self.mini_batch = None if self.mini_batch is None else int(self.mini_batch)

    def batches(self, n, device):
        """The syn_steps mini-batches of one iteration out of n pairs, [syn_steps, batch]
        indices drawn up front (one host-to-device copy)."""
        if self.mini_batch is None:
            return torch.arange(n, device=device).expand(self.syn_steps, n)
        if self.syn_steps == 0:
            return torch.zeros(0, min(self.mini_batch, n), dtype=torch.long, device=device)
        idx = torch.stack([torch.randperm(n, generator=self.gen)[:self.mini_batch]
                           for _ in range(self.syn_steps)])
        if device.type == "cuda":   # pinned, asynchronous: no wait for the GPU queue
            return idx.pin_memory().to(device, non_blocking=True)
        return idx.to(device)

    def image_features(self, th_i, feats):
        """The image tail at the flat parameters th_i on trunk features, evaluated through
        its fast-path copy (fastpath.unroll_tail)."""
        fast, buffers = unroll_tail(self.model)
        return functional_call(fast, {**buffers, **self.layouts["image"].unflatten(th_i)},
                               (feats,))

    def step_loss(self, th_i, th_t, x_b, texts_b, b=None):
        """The inner (contrastive) loss of one step on the mini-batch of pair indices b at the
        flat parameters th_i (image tail) and th_t (text head). x_b are the trunk features of
        its images, or, with th_i None, the image encoder's output itself (the tail not
        unrolled)."""
        if self.blend is not None:
            lam, perm = draw_blend(len(x_b), self.blend, x_b.device)
            x_b, texts_b = blend(x_b, texts_b, lam, perm)
        img_f = x_b if th_i is None else self.image_features(th_i, x_b)
        txt_f = functional_call(self.model.head, self.layouts["text"].unflatten(th_t),
                                (texts_b,))
        if self.similarity is not None:
            return wbce_loss(img_f, txt_f, self.scale, self.similarity.block(b))
        return contrastive_loss(img_f, txt_f, self.scale)


def draw_blend(n: int, alpha: float, device):
    """RepBlend's draw for one step of n pairs: lambda ~ Beta(alpha, alpha) and a permutation,
    from the default generator of `device`."""
    a = torch.tensor(float(alpha), device=device)
    return torch.distributions.Beta(a, a).sample(), torch.randperm(n, device=device)


def blend(x, y, lam, perm):
    """Representation blending: lam * v + (1 - lam) * v[perm] for the image features x and the
    text embeddings y, the same lambda and permutation for both (the targets stay those of
    the unblended pairs)."""
    return lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]


def distilled_trunk_features(model, pixels, opts: EngineOptions | None = None, grad=True):
    """The frozen trunk on the distilled pixels (with its graph when `grad`), in the layout
    and precision of `opts`; the features come back in the pixels' dtype."""
    opts = opts or EngineOptions()
    x = pixels
    if pixels.is_cuda and opts.channels_last and pixels.dim() == 4:
        x = pixels.contiguous(memory_format=torch.channels_last)
    cast = (torch.autocast(device_type=pixels.device.type, dtype=torch.bfloat16)
            if opts.autocast == "bf16" else nullcontext())
    with torch.set_grad_enabled(grad and pixels.requires_grad), cast:
        feats = model.tower.trunk(x)
    if feats.dtype != pixels.dtype:     # autocast: back to the pixels' precision
        feats = feats.to(pixels.dtype)
    return feats


def grads_of(loss, inputs, create_graph=False):
    """autograd.grad over the inputs that require grad; None for the others (and for those
    the loss does not depend on)."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = (iter(torch.autograd.grad(loss, live, create_graph=create_graph, allow_unused=True))
           if live else iter(()))
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


def unroll(u: Unroll, feats, texts, lr_img, lr_txt, step_image=True) -> dict:
    """u.syn_steps differentiable SGD steps from u.theta0 on (feats, texts); returns the end
    point {"image": ..., "text": ...}.

    feats are trunk features of the distilled images (a function of the pixels), texts the
    distilled sentence embeddings. Every step keeps its graph (create_graph=True), so the end
    point is an exact differentiable function of pixels, texts and lrs. With step_image False
    the image tail is not unrolled: it stays at theta0, feats are its output, and only the
    text head steps (heads-only).
    """
    th_i = u.theta0["image"].clone().requires_grad_(True) if step_image else None
    th_t = u.theta0["text"].clone().requires_grad_(True)
    idx = u.batches(len(texts), texts.device)
    for k in range(u.syn_steps):
        b = idx[k]
        loss = u.step_loss(th_i, th_t, feats[b], texts[b], b)
        g_i, g_t = grads_of(loss, [th_i, th_t], create_graph=True)
        if g_i is not None:
            th_i = th_i - lr_img * g_i
        th_t = th_t - lr_txt * g_t
    return {"image": u.theta0["image"] if th_i is None else th_i, "text": th_t}
