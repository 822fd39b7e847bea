"""The CPU fast path: the copy of the image tail that every engine evaluates.

The unroll differentiates every step twice (create_graph). On CPU the double backward of a
grouped (depthwise) convolution runs as one small convolution per channel, a 1x1 convolution
through oneDNN reorders its (new every step) weights on every call, and the batch-norm backward
kernels are slow next to the few elementwise products an eval-mode batch norm amounts to.
`unroll_tail` therefore evaluates a copy of the tail whose modules compute the same functions
another way: 1x1 and depthwise convolutions on small maps as matrix products (_GemmConv2d),
eval-mode batch norms as an affine map (_AffineBatchNorm). Same parameter names, so the flat
layouts apply; larger maps, training-mode batch norms and any other module take the ordinary
path.
"""
from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

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

    The same function; as a GEMM (1x1) and as a dense product with constant shift matrices
    (depthwise, maps up to 4 x 4) its double backward is cheap on CPU. Larger maps, and any
    other convolution, take the ordinary path.
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
    """Mixin for the batch norms of _affine_bases(): in eval mode, on running statistics,
    x * scale + shift written out, whose double backward is a few elementwise products
    instead of the batch-norm backward kernels; then the module's dropout and activation when
    its class applies them (`activates`). Training mode takes the ordinary path."""

    activates = False

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
        if self.activates:
            y = self.act(self.drop(y))
        return y


@cache
def _affine_bases() -> dict:
    """The batch-norm classes the fast path writes out, each with whether it applies its
    dropout and activation after the normalisation: nn.BatchNorm2d, and timm's BatchNormAct2d
    (EfficientNet's norm + activation). Exact types: a subclass may compute something else."""
    from timm.layers import BatchNormAct2d

    return {nn.BatchNorm2d: False, BatchNormAct2d: True}


def _affine_class(cls):
    if cls not in _AFFINE:
        _AFFINE[cls] = type(f"_Affine{cls.__name__}", (_AffineBatchNorm, cls),
                            {"activates": _affine_bases()[cls]})
    return _AFFINE[cls]


_AFFINE: dict = {}


def _fast_class(mod):
    """The drop-in class for a module of the unrolled tail, or None to keep it."""
    if type(mod) is nn.Conv2d:
        return _GemmConv2d
    if type(mod) in _affine_bases():
        return _affine_class(type(mod))
    return None


def unroll_tail(model):
    """The module the engines evaluate for the image tail: a copy of model.tail whose plain
    convolutions are _GemmConv2d and whose batch norms are _AffineBatchNorm (the same
    functions, same parameter names, so the flat layouts apply), and the buffers to pass to
    functional_call (model.tail's). Built once per tail; its train/eval flags follow
    model.tail's at every call."""
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
