"""Distillation engines: the meta-gradient of the matching loss w.r.t. the distilled data.

One distillation iteration starts a student at an expert's theta_0, takes K = syn_steps SGD
steps on mini-batches of the distilled pairs,

    theta_{k+1} = theta_k - lr * g_k,     g_k = grad_theta l(theta_k; X_k, T_k),

and scores the end point with the matching loss L(theta_K). An engine returns L and its
gradient w.r.t. the pixels, the text embeddings and the two lrs. They differ in how:

- ``exact``: backpropagation through time. All K steps keep their graph (create_graph), the
  frozen trunk runs once on the pixels. Fastest; memory grows linearly with K.
- ``checkpointed``: the same gradient, by a hand-written reverse pass. The forward pass keeps
  no graph, only a parameter snapshot every `segment` steps; the reverse pass recomputes one
  step at a time with a graph and takes its vector-Jacobian product with the adjoint
  lambda_{k+1} = dL/dtheta_{k+1}:

      lambda_k = lambda_{k+1} - H_k (lr * lambda_{k+1})       (H_k = dg_k/dtheta_k)
      dL/dX   -= (dg_k/dX)^T (lr * lambda_{k+1})
      dL/dlr  -= g_k . lambda_{k+1}                            (per encoder)

  Memory: one step's graph plus K/segment + segment snapshots (and the trunk recomputed
  in chunks of TRUNK_CHUNK images for the pixel gradient); time: about one extra gradient
  evaluation per step.
- ``constant-memory``: the TESLA gradient of LoRS (Cui et al. 2023; Xu et al. 2024). The
  same recurrence with lambda_k frozen at lambda_K, i.e. without the second-order terms
  H_k that carry a change of X_k into the later steps. An approximation; memory does not
  depend on K (two forward passes, no snapshots). Its lr gradient, -sum_k g_k . lambda_K, is
  LoRS's.
- ``heads-only``: the image encoder is not unrolled: its tail stays at the expert's theta_0
  (run once on all distilled images), and only the text head takes the K steps (exact BPTT).
  The matching loss counts the text head only. Gradients still reach the pixels through the
  frozen image encoder. With ``trainable: none`` it is the same as ``exact``; with LoRA
  (the image group holds adapters only) the adapters are unrolled with the head, i.e. also
  the same as ``exact``.

All engines evaluate the tail through `unroll_tail`: the same function, with 1x1 and
depthwise convolutions on small maps computed as matrix products and eval-mode batch norms
as an affine map, whose double backward is several times cheaper on CPU than that of the
convolution and batch-norm kernels.

Every engine draws the mini-batches from `gen` and the dropout masks from the global torch
generator in the same order as ``exact``; the recomputing engines replay the dropout masks of
each step and leave the generators where ``exact`` leaves them, so switching engines changes
nothing but the gradient's arithmetic (and, for constant-memory, its approximation).
"""
from __future__ import annotations

import copy
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from .losses import GROUPS, contrastive_loss, matching_loss, matching_terms  # noqa: F401
from .errors import VlddError

ENGINES = ("exact", "checkpointed", "constant-memory", "heads-only")


@dataclass
class EngineOptions:
    """Numerics and layout. The defaults keep fp32 everywhere (the 1e-4 gradient agreement of
    the engines is checked in fp32)."""
    autocast: str = "none"        # "bf16": the frozen trunk forward in bfloat16 autocast
    tf32: bool = False            # TF32 matmuls and convolutions on CUDA
    channels_last: bool = True    # channels_last trunk and pixels on CUDA (ignored on CPU)
    segment: int | None = None    # checkpointed: steps per snapshot (None: ceil(sqrt(K)))

    @classmethod
    def from_config(cls, cfg: dict):
        seg = cfg.get("segment_steps")
        return cls(autocast=str(cfg.get("autocast", "none")), tf32=bool(cfg.get("tf32", False)),
                   channels_last=bool(cfg.get("channels_last", True)),
                   segment=None if seg is None else int(seg))


def check_engine(name: str):
    if name not in ENGINES:
        raise VlddError(f"distill.engine '{name}' is unknown: choose one of {', '.join(ENGINES)}.")


def apply_backend(opts: EngineOptions, model, device: torch.device):
    """Process-wide backend switches and the trunk's memory format (once per run)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(opts.tf32)
        torch.backends.cudnn.allow_tf32 = bool(opts.tf32)
        if opts.channels_last:
            model.tower.trunk.to(memory_format=torch.channels_last)
    if opts.autocast not in ("none", "bf16"):
        raise VlddError(f"distill.autocast '{opts.autocast}' must be none or bf16.")


# ----------------------------------------------------------------------------- pieces


def batches(gen, n, mini_batch, syn_steps, device):
    """The K mini-batches of one iteration, drawn up front (one host-to-device copy)."""
    if syn_steps == 0:
        return torch.zeros(0, min(mini_batch, n), dtype=torch.long, device=device)
    idx = torch.stack([torch.randperm(n, generator=gen)[:mini_batch] for _ in range(syn_steps)])
    if device.type == "cuda":   # pinned, asynchronous: no wait for the GPU queue
        return idx.pin_memory().to(device, non_blocking=True)
    return idx.to(device)


def trunk_features(model, pixels, opts: EngineOptions | None = None, grad=True):
    """The frozen trunk on the distilled pixels (with its graph when `grad`)."""
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


# ----------------------------------------------------------------------------- the tail

GEMM_MAX_POSITIONS = 256   # 1x1 convolutions as GEMMs on maps up to 16 x 16
DENSE_MAX_POSITIONS = 16   # depthwise convolutions as dense products on maps up to 4 x 4


def _shift_matrices(h, w, kernel, padding, stride, like):
    """[kh * kw, ho, wo, h * w]: S[k, i, j, p] = 1 where output (i, j) reads input p through
    kernel offset k (cached per shape)."""
    key = (h, w, tuple(kernel), tuple(padding), tuple(stride), like.device, like.dtype)
    out = _SHIFTS.get(key)
    if out is None:
        (kh, kw), (ph, pw), (sh, sw) = kernel, padding, stride
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        out = torch.zeros(kh * kw, ho, wo, h * w, dtype=like.dtype)
        for a in range(kh):
            for b in range(kw):
                for i in range(ho):
                    for j in range(wo):
                        y, x = i * sh + a - ph, j * sw + b - pw
                        if 0 <= y < h and 0 <= x < w:
                            out[a * kw + b, i, j, y * w + x] = 1.0
        out = out.to(like.device)
        _SHIFTS[key] = out
    return out


_SHIFTS: dict = {}


class _GemmConv2d(nn.Conv2d):
    """nn.Conv2d with its 1x1 and depthwise cases computed as matrix products on small maps.

    The same function; but the unroll differentiates every step twice (create_graph), and
    the double backward of a grouped (depthwise) convolution runs as one small convolution
    per channel on CPU, and a 1x1 convolution through oneDNN reorders its (new every step)
    weights on every call. As a GEMM (1x1) and as a dense product with constant shift
    matrices (depthwise, maps up to 4 x 4) both are cheap. Larger maps, and any other
    convolution, take the ordinary path.
    """

    def forward(self, x):
        if (x.dim() != 4 or x.shape[-1] * x.shape[-2] > GEMM_MAX_POSITIONS
                or self.padding_mode != "zeros" or self.dilation != (1, 1)
                or isinstance(self.padding, str)):
            return super().forward(x)
        n, c, h, w = x.shape
        kh, kw = self.kernel_size
        if (kh, kw) == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) \
                and self.groups == 1:
            y = F.linear(x.permute(0, 2, 3, 1), self.weight.view(self.out_channels, c))
            y = y.permute(0, 3, 1, 2)
        elif self.groups == c == self.out_channels and h * w <= DENSE_MAX_POSITIONS:
            # depthwise on a tiny map: out[n, c] = M_c @ x[n, c] with M_c = sum_k w[c, k] S_k,
            # S_k the (constant) 0/1 matrix of kernel offset k (zero padding, stride)
            shifts = _shift_matrices(h, w, (kh, kw), self.padding, self.stride, x)
            ho, wo = shifts.shape[1], shifts.shape[2]
            m = (self.weight.view(c, kh * kw) @ shifts.view(kh * kw, -1)).view(c, ho * wo, h * w)
            y = (m.unsqueeze(0) * x.reshape(n, c, 1, h * w)).sum(-1).view(n, c, ho, wo)
        else:
            return super().forward(x)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)


class _AffineBatchNorm:
    """Mixin for BatchNorm2d (and timm's BatchNormAct2d): in eval mode, on running statistics,
    x * scale + shift written out, whose double backward is a few elementwise products
    instead of the batch-norm backward kernels. Training mode takes the ordinary path."""

    def forward(self, x):
        if self.training or self.running_mean is None or self.running_var is None \
                or x.dim() != 4:
            return super().forward(x)
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if type(self).__mro__[2].__name__ == "BatchNormAct2d":
            y = self.act(self.drop(y))
        return y


def _affine_class(cls):
    if cls not in _AFFINE:
        _AFFINE[cls] = type(f"_Affine{cls.__name__}", (_AffineBatchNorm, cls), {})
    return _AFFINE[cls]


_AFFINE: dict = {}


def _fast_class(mod):
    """The drop-in class for a module of the unrolled tail, or None to keep it."""
    if type(mod) is nn.Conv2d:
        return _GemmConv2d
    if type(mod) is nn.BatchNorm2d or (type(mod).__name__ == "BatchNormAct2d"
                                       and type(mod).__module__.startswith("timm.")
                                       and type(mod).__mro__[1] is nn.BatchNorm2d):
        return _affine_class(type(mod))
    return None


def unroll_tail(model):
    """The module the engines evaluate for the image tail: a copy of model.tail whose plain
    convolutions are _GemmConv2d and whose batch norms are _AffineBatchNorm (the same
    functions, same parameter names, so the flat layouts apply). Built
    once per tail; its train/eval flags follow model.tail's at every call, and its buffers are
    model.tail's (passed to functional_call)."""
    tail = model.tail
    if not any(_fast_class(m) is not None for m in tail.modules()):
        return tail, {}
    where = [(t.device, t.dtype) for t in tail.parameters()][:1]
    cached = getattr(model, "_unroll_tail", None)
    if cached is None or cached[0] is not tail or cached[1] != where:
        fast = copy.deepcopy(tail)
        for mod in fast.modules():
            cls = _fast_class(mod)
            if cls is not None:
                mod.__class__ = cls
        cached = (tail, where, fast, list(zip(tail.modules(), fast.modules())))
        model._unroll_tail = cached
    for a, b in cached[3]:
        b.training = a.training
    return cached[2], dict(tail.named_buffers())


def tail_call(model, flat_layout, th_i, feats):
    fast, buffers = unroll_tail(model)
    return functional_call(fast, {**buffers, **flat_layout.unflatten(th_i)}, (feats,))


def step_loss(model, layouts, th_i, th_t, feats_b, texts_b, scale):
    img_f = tail_call(model, layouts["image"], th_i, feats_b)
    txt_f = functional_call(model.head, layouts["text"].unflatten(th_t), (texts_b,))
    return contrastive_loss(img_f, txt_f, scale)


def _rng_get(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(state, device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def _grads(loss, inputs):
    """autograd.grad over the inputs that require grad; None for the others."""
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True)) if live else iter(())
    return [next(got) if (t is not None and t.requires_grad) else None for t in inputs]


# ----------------------------------------------------------------------------- exact


def unroll(model, layouts, theta0: dict, feats, texts, lr_img, lr_txt, *, syn_steps, mini_batch,
           scale, gen, idx=None):
    """syn_steps differentiable SGD steps from theta0 on (feats, texts); returns the end point.

    feats are trunk features of the distilled images (a function of the pixels), texts the
    distilled sentence embeddings. Every step keeps its graph (create_graph=True), so the end
    point is an exact differentiable function of pixels, texts and lrs.
    """
    th_i = theta0["image"].clone().requires_grad_(True)
    th_t = theta0["text"].clone().requires_grad_(True)
    if idx is None:
        idx = batches(gen, len(texts), mini_batch, syn_steps, texts.device)
    for k in range(syn_steps):
        b = idx[k]
        loss = step_loss(model, layouts, th_i, th_t, feats[b], texts[b], scale)
        g_i, g_t = torch.autograd.grad(loss, [th_i, th_t], create_graph=True, allow_unused=True)
        if g_i is not None:
            th_i = th_i - lr_img * g_i
        th_t = th_t - lr_txt * g_t
    return {"image": th_i, "text": th_t}


def _exact(model, layouts, theta0, target, pixels, texts, lr_img, lr_txt, *, syn_steps,
           mini_batch, scale, gen, opts, terms=None):
    feats = trunk_features(model, pixels, opts)
    end = unroll(model, layouts, theta0, feats, texts, lr_img, lr_txt, syn_steps=syn_steps,
                 mini_batch=mini_batch, scale=scale, gen=gen)
    loss = matching_loss(end, theta0, target, terms=terms)
    return loss.detach(), _grads(loss, [pixels, texts, lr_img, lr_txt])


# ----------------------------------------------------------------------------- heads-only


def is_adapter_layout(layout) -> bool:
    """True when the image group holds LoRA adapters only (model.image_encoder.trainable:
    lora): heads-only unrolls those, as they are the trainable part of a frozen encoder."""
    return bool(layout.names) and all(".lora_" in f".{n}" for n in layout.names)


def _heads_only(model, layouts, theta0, target, pixels, texts, lr_img, lr_txt, *, syn_steps,
                mini_batch, scale, gen, opts, terms=None):
    if is_adapter_layout(layouts["image"]):
        return _exact(model, layouts, theta0, target, pixels, texts, lr_img, lr_txt,
                      syn_steps=syn_steps, mini_batch=mini_batch, scale=scale, gen=gen,
                      opts=opts, terms=terms)
    feats = trunk_features(model, pixels, opts)
    img_f = tail_call(model, layouts["image"], theta0["image"], feats)
    idx = batches(gen, len(texts), mini_batch, syn_steps, texts.device)
    th_t = theta0["text"].clone().requires_grad_(True)
    for k in range(syn_steps):
        b = idx[k]
        txt_f = functional_call(model.head, layouts["text"].unflatten(th_t), (texts[b],))
        loss = contrastive_loss(img_f[b], txt_f, scale)
        (g_t,) = torch.autograd.grad(loss, [th_t], create_graph=True)
        th_t = th_t - lr_txt * g_t
    loss = matching_loss({"image": theta0["image"], "text": th_t}, theta0, target,
                         groups=("text",), terms=terms)
    g_pix, g_txt, _, g_lr_t = _grads(loss, [pixels, texts, None, lr_txt])
    return loss.detach(), [g_pix, g_txt, None, g_lr_t]


# ----------------------------------------------------------------------------- recomputing


class _Replay:
    """What a recomputing engine needs to redo step k exactly: the data, the mini-batches,
    the dropout generator state before each step."""

    def __init__(self, model, layouts, feats, texts, idx, scale, device):
        self.model, self.layouts, self.feats, self.texts = model, layouts, feats, texts
        self.idx, self.scale, self.device = idx, scale, device
        self.rng = []

    def grad(self, k, th, create_graph=False):
        """(g_i, g_t, feats_b, texts_b) of step k at th = (th_i, th_t) (leaves)."""
        _rng_set(self.rng[k], self.device)
        b = self.idx[k]
        fb = self.feats[b].detach().requires_grad_(create_graph)
        tb = self.texts[b].detach().requires_grad_(create_graph and self.texts.requires_grad)
        loss = step_loss(self.model, self.layouts, th[0], th[1], fb, tb, self.scale)
        g_i, g_t = torch.autograd.grad(loss, list(th), create_graph=create_graph,
                                       allow_unused=True)
        if g_i is None:
            g_i = torch.zeros_like(th[0])
        return g_i, g_t, fb, tb

    def forward(self, k, th_data, lrs):
        """theta_{k+1} (no graph) from theta_k; records the rng state of step k."""
        if k == len(self.rng):
            self.rng.append(_rng_get(self.device))
        th = tuple(t.detach().requires_grad_(True) for t in th_data)
        with torch.enable_grad():
            g_i, g_t, _, _ = self.grad(k, th)
        with torch.no_grad():
            return (th_data[0] - lrs[0] * g_i, th_data[1] - lrs[1] * g_t), (g_i, g_t)


def _adjoint_end(theta_end, theta0, target, groups=GROUPS, terms=None):
    """L(theta_K) and lambda_K = dL/dtheta_K."""
    th = {g: theta_end[i].detach().requires_grad_(True) for i, g in enumerate(GROUPS)}
    with torch.enable_grad():
        loss = matching_loss(th, theta0, target, groups, terms=terms)
        if not torch.is_tensor(loss):
            loss = torch.zeros((), device=theta0["text"].device)
            lam = tuple(torch.zeros_like(th[g]) for g in GROUPS)
        else:
            lam = tuple(torch.autograd.grad(loss, [th[g]], allow_unused=True)[0]
                        for g in GROUPS)
            lam = tuple(torch.zeros_like(th[g]) if l is None else l
                        for g, l in zip(GROUPS, lam))
    return loss.detach(), lam


def _vjp_step(replay, k, th_data, lrs, lam, dfeats, dtexts, need_hv):
    """One recomputed step's contribution: returns (g, H (lr*lam)) and accumulates dX, dT."""
    th = tuple(t.detach().requires_grad_(True) for t in th_data)
    with torch.enable_grad():
        g_i, g_t, fb, tb = replay.grad(k, th, create_graph=True)
        s = (g_i * (lrs[0] * lam[0])).sum() + (g_t * (lrs[1] * lam[1])).sum()
        inputs = ([th[0], th[1]] if need_hv else []) + [fb] + ([tb] if tb.requires_grad else [])
        out = torch.autograd.grad(s, inputs, allow_unused=True)
    out = list(out)
    hv = (out.pop(0), out.pop(0)) if need_hv else None
    d_fb = out.pop(0)
    d_tb = out.pop(0) if tb.requires_grad else None
    b = replay.idx[k]
    if d_fb is not None:
        dfeats.index_add_(0, b, d_fb, alpha=-1.0)
    if d_tb is not None:
        dtexts.index_add_(0, b, d_tb, alpha=-1.0)
    return (g_i.detach(), g_t.detach()), hv


TRUNK_CHUNK = 16   # images per trunk recomputation in the recomputing engines


def _pixel_grad(model, pixels, feats, dfeats, opts):
    """dL/dpixels from dL/dfeats: the trunk recomputed with a graph, TRUNK_CHUNK images at
    a time (it is per image: batch norms run on running statistics), so that its activations
    never all live at once."""
    if not pixels.requires_grad:
        return None
    if feats is pixels:
        return dfeats
    out = []
    for i in range(0, len(pixels), TRUNK_CHUNK):
        part = pixels[i:i + TRUNK_CHUNK].detach().requires_grad_(True)
        with torch.enable_grad():
            again = trunk_features(model, part, opts, grad=True)
            (g,) = torch.autograd.grad(again, [part],
                                       grad_outputs=dfeats[i:i + TRUNK_CHUNK].to(again.dtype))
        out.append(g)
    return torch.cat(out) if out else torch.zeros_like(pixels)


def _lr_grads(lr_img, lr_txt, d_lr, image_unrolled):
    g_i = d_lr[0].to(lr_img.dtype).reshape(lr_img.shape) if image_unrolled else None
    g_t = d_lr[1].to(lr_txt.dtype).reshape(lr_txt.shape)
    return (g_i if lr_img.requires_grad else None), (g_t if lr_txt.requires_grad else None)


def _setup_recompute(model, layouts, theta0, pixels, texts, lr_img, lr_txt, syn_steps,
                     mini_batch, scale, gen, opts):
    with torch.no_grad():
        feats = trunk_features(model, pixels, opts, grad=False)
    idx = batches(gen, len(texts), mini_batch, syn_steps, texts.device)
    replay = _Replay(model, layouts, feats, texts, idx, scale, texts.device)
    lrs = (lr_img.detach(), lr_txt.detach())
    th0 = (theta0["image"].detach(), theta0["text"].detach())
    return feats, replay, lrs, th0


def _checkpointed(model, layouts, theta0, target, pixels, texts, lr_img, lr_txt, *, syn_steps,
                  mini_batch, scale, gen, opts, terms=None):
    feats, replay, lrs, th = _setup_recompute(model, layouts, theta0, pixels, texts, lr_img,
                                              lr_txt, syn_steps, mini_batch, scale, gen, opts)
    K = syn_steps
    seg = opts.segment or max(1, math.ceil(math.sqrt(K)))
    snaps = {}
    for k in range(K):
        if k % seg == 0:
            snaps[k] = th
        th, _ = replay.forward(k, th, lrs)
    rng_after = _rng_get(replay.device)
    loss, lam = _adjoint_end(th, theta0, target, terms=terms)
    dfeats = torch.zeros_like(feats)
    dtexts = torch.zeros_like(texts)
    d_lr = [torch.zeros((), device=texts.device, dtype=th[1].dtype) for _ in GROUPS]
    for start in reversed(range(0, K, seg)):
        stop = min(start + seg, K)
        inside = [snaps.pop(start)]
        for k in range(start, stop - 1):       # the segment's snapshots, recomputed
            nxt, _ = replay.forward(k, inside[-1], lrs)
            inside.append(nxt)
        for k in reversed(range(start, stop)):
            g, hv = _vjp_step(replay, k, inside.pop(), lrs, lam, dfeats, dtexts, need_hv=True)
            with torch.no_grad():
                d_lr[0] -= (g[0] * lam[0]).sum()
                d_lr[1] -= (g[1] * lam[1]).sum()
                lam = (lam[0] - hv[0] if hv[0] is not None else lam[0],
                       lam[1] - hv[1] if hv[1] is not None else lam[1])
    _rng_set(rng_after, replay.device)
    g_pix = _pixel_grad(model, pixels, feats, dfeats, opts)
    g_lr_i, g_lr_t = _lr_grads(lr_img, lr_txt, d_lr, theta0["image"].numel() > 0)
    return loss, [g_pix, dtexts if texts.requires_grad else None, g_lr_i, g_lr_t]


def _constant_memory(model, layouts, theta0, target, pixels, texts, lr_img, lr_txt, *,
                     syn_steps, mini_batch, scale, gen, opts, terms=None):
    feats, replay, lrs, th = _setup_recompute(model, layouts, theta0, pixels, texts, lr_img,
                                              lr_txt, syn_steps, mini_batch, scale, gen, opts)
    G = [torch.zeros_like(t) for t in th]
    for k in range(syn_steps):
        th, g = replay.forward(k, th, lrs)
        G[0] += g[0]
        G[1] += g[1]
    rng_after = _rng_get(replay.device)
    loss, lam = _adjoint_end(th, theta0, target, terms=terms)
    d_lr = [-(G[0] * lam[0]).sum(), -(G[1] * lam[1]).sum()]
    del G
    dfeats = torch.zeros_like(feats)
    dtexts = torch.zeros_like(texts)
    th = (theta0["image"].detach(), theta0["text"].detach())
    for k in range(syn_steps):   # second pass, forward again: lambda_k := lambda_K
        g, _ = _vjp_step(replay, k, th, lrs, lam, dfeats, dtexts, need_hv=False)
        with torch.no_grad():
            th = (th[0] - lrs[0] * g[0], th[1] - lrs[1] * g[1])
    _rng_set(rng_after, replay.device)
    g_pix = _pixel_grad(model, pixels, feats, dfeats, opts)
    g_lr_i, g_lr_t = _lr_grads(lr_img, lr_txt, d_lr, theta0["image"].numel() > 0)
    return loss, [g_pix, dtexts if texts.requires_grad else None, g_lr_i, g_lr_t]


_IMPL = {"exact": _exact, "checkpointed": _checkpointed, "constant-memory": _constant_memory,
         "heads-only": _heads_only}


def meta_gradient(engine, model, layouts, theta0: dict, target: dict, pixels, texts, lr_img,
                  lr_txt, *, syn_steps, mini_batch, scale, gen, opts: EngineOptions | None = None,
                  terms: dict | None = None):
    """(matching loss, [dL/dpixels, dL/dtexts, dL/dlr_img, dL/dlr_txt]) of one iteration.

    pixels: distilled images in the trunk's input space; texts: distilled sentence
    embeddings; theta0 / target: flat expert parameters per group ("image" = the tail,
    "text" = the head). A gradient is None where the input does not require grad or the
    loss does not depend on it. The loss is a detached 0-dim tensor (no host sync here).
    `terms`, when a dict, receives each encoder's normalised term of the loss.
    """
    check_engine(engine)
    return _IMPL[engine](model, layouts, theta0, target, pixels, texts, lr_img, lr_txt,
                         syn_steps=int(syn_steps), mini_batch=int(mini_batch), scale=scale,
                         gen=gen, opts=opts or EngineOptions(), terms=terms)
