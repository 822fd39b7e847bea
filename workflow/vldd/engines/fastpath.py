"""The CPU fast path: the copy of the image tail that every engine evaluates.

The unroll differentiates every step twice (create_graph) and keeps every step's graph. On
CPU the double backward of a grouped (depthwise) convolution runs as one small convolution
per channel, a 1x1 convolution through oneDNN reorders its (new every step) weights on every
call, and the batch-norm backward kernels are slow next to the few elementwise products an
eval-mode batch norm amounts to. `unroll_tail` therefore evaluates a copy of the tail whose
modules compute the same functions another way:

- convolutions (_FastConv: nn.Conv2d and timm's Conv2dSame, ScaledStdConv2d(Same)): 1x1 ones
  on small maps as one GEMM, depthwise ones on small maps as one batched product with constant
  shift matrices, both on the [c, h, w, n] layout their results come in, so that a chain of
  them reads its operands without copies;
- eval-mode batch norms (_AffineBatchNorm) as an affine map, their scale folded into the
  convolution before them where nothing else reads its output (fold_norms; then the norm does
  not keep that output for its backward), and ReLU / ReLU6 after them as a clamp whose
  backward keeps a boolean mask (_Clamp).

Its effect at both settings is in benchmarks/README.md ("Both settings after the
whole-encoder work"). Same parameter names, so the flat layouts apply; larger maps,
training-mode batch norms and any other module take the ordinary path.
"""
from __future__ import annotations

import copy
from functools import cache

import torch
import torch.nn as nn
import torch.nn.functional as F

GEMM_MAX_POSITIONS = 256   # 1x1 convolutions as GEMMs on maps up to 16 x 16
DENSE_MAX_PAIRS = 4096     # depthwise ones as batched products while (output positions) x
                           # (input positions) <= this: maps up to 8 x 8


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


class _FastConv:
    """Mixin for the convolutions of _conv_bases(): their 1x1 and depthwise cases on small
    maps as matrix products, whose double backward is cheap on CPU; the same function.

    A 1x1 convolution is a GEMM on maps up to GEMM_MAX_POSITIONS. A depthwise one is, per
    channel c, out[n, c] = M_c @ x[n, c] with M_c = sum_k w[c, k] S_k, S_k the constant 0/1
    matrix of kernel offset k (zero padding, stride): one batched product [c, P, Q] @
    [c, Q, n] while P * Q <= DENSE_MAX_PAIRS. The class's own steps come first and stay as
    they are: timm's "same" padding computed from the input (Conv2dSame, `same`), its scaled
    weight standardisation (ScaledStdConv2d, NFNet's, `standardised`). Anything else takes
    the ordinary convolution.
    """

    same = False            # pad_same on the input first (timm Conv2dSame)
    standardised = False    # the weight scaled and standardised first (timm ScaledStdConv2d)

    def forward(self, x):
        if self.padding_mode != "zeros":
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if self.same or getattr(self, "same_pad", False):
            x = _pad_same()(x, self.kernel_size, self.stride, self.dilation)
        if self.standardised:
            weight = F.batch_norm(weight.reshape(1, self.out_channels, -1), None, None,
                                  weight=(self.gain * self.scale).view(-1), training=True,
                                  momentum=0.0, eps=self.eps).reshape_as(weight)
        norm = self.__dict__.get("_folded_norm")   # fold_norms(): the batch norm's scale here
        scale = None if norm is None else norm.eval_scale()
        if scale is not None:
            weight = weight * scale.view(-1, 1, 1, 1)
            bias = None if bias is None else bias * scale
        y = self._product(x, weight)
        if y is None:
            return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation,
                            self.groups)
        return y if bias is None else y + bias.view(1, -1, 1, 1)

    def _product(self, x, weight):
        """The convolution as a matrix product, or None where it has none here."""
        if x.dim() != 4 or self.dilation != (1, 1) or isinstance(self.padding, str):
            return None
        n, c, h, w = x.shape
        (kh, kw), (ph, pw), (sh, sw) = self.kernel_size, self.padding, self.stride
        if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0) and self.groups == 1 \
                and h * w <= GEMM_MAX_POSITIONS:
            y = weight.view(self.out_channels, c) @ _channels_first(x).view(c, h * w * n)
            return y.view(self.out_channels, h, w, n).permute(3, 0, 1, 2)
        ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
        if not (self.groups == c == self.out_channels and ho * wo * h * w <= DENSE_MAX_PAIRS):
            return None
        shifts = _shift_matrices(h, w, (kh, kw), self.padding, self.stride, x)
        m = (weight.view(c, kh * kw) @ shifts.view(kh * kw, -1)).view(c, ho * wo, h * w)
        y = torch.bmm(m, _channels_first(x).view(c, h * w, n))
        return _ContiguousGrad.apply(y).view(c, ho, wo, n).permute(3, 0, 1, 2)


@cache
def _pad_same():
    from timm.layers import pad_same

    return pad_same


def _channels_first(x):
    """x [n, c, h, w] as the contiguous [c, h, w, n] the products read: a view when x is
    already laid out so (the output of a product), else one copy."""
    return x.permute(1, 2, 3, 0).contiguous()


class _GemmConv2d(_FastConv, nn.Conv2d):
    """nn.Conv2d through _FastConv."""


class _ContiguousGrad(torch.autograd.Function):
    """The identity, whose gradient comes back contiguous: the batched product's gradients
    then reach BLAS in one piece (a strided one is copied matrix by matrix)."""

    @staticmethod
    def forward(ctx, t):
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


class _AffineBatchNorm:
    """Mixin for the batch norms of _affine_bases(): in eval mode, on running statistics,
    x * scale + shift written out, whose double backward is a few elementwise products
    instead of the batch-norm backward kernels; then the module's dropout and activation when
    its class applies them (`activates`). Training mode takes the ordinary path."""

    activates = False
    folded = False      # fold_norms(): its convolution already multiplied by the scale

    def eval_scale(self):
        """The per-channel scale of the eval-mode map, or None in training mode."""
        if self.training or self.running_mean is None or self.running_var is None:
            return None
        scale = torch.rsqrt(self.running_var + self.eps)
        return scale if self.weight is None else scale * self.weight

    def forward(self, x):
        scale = self.eval_scale() if x.dim() == 4 else None
        if scale is None:
            return super().forward(x)
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        if self.folded:
            y = x + shift.view(1, -1, 1, 1)
        else:
            y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        if self.activates:
            y = self.drop(y)
            bounds = _CLAMPS.get(type(self.act))
            y = self.act(y) if bounds is None else _Clamp.apply(y, *bounds)
        return y


class _Clamp(torch.autograd.Function):
    """ReLU / ReLU6 as clamp(x, lo, hi) whose backward keeps a boolean mask (lo < x < hi, as
    PyTorch's threshold and hardtanh backward) instead of the float input. Piecewise linear:
    the backward, grad where mask else 0, is linear in grad, so its own derivative needs the
    mask only (hardtanh's double backward keeps grad and input, and adds zeros for the
    input)."""

    @staticmethod
    def forward(ctx, x, lo, hi):
        ctx.save_for_backward((x > lo) & (x < hi))
        return x.clamp(lo, hi)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        # a selection, not g * mask: a NaN or inf in g where the unit is off stays out, as
        # in hardtanh's backward (e.g. the double backward of F.normalize at a zero vector)
        return torch.where(mask, g, g.new_zeros(())), None, None


_CLAMPS = {nn.ReLU: (0.0, float("inf")), nn.ReLU6: (0.0, 6.0)}


@cache
def _affine_bases() -> dict:
    """The batch-norm classes the fast path writes out, each with whether it applies its
    dropout and activation after the normalisation: nn.BatchNorm2d, and timm's BatchNormAct2d
    (EfficientNet's norm + activation). Exact types: a subclass may compute something else."""
    from timm.layers import BatchNormAct2d

    return {nn.BatchNorm2d: False, BatchNormAct2d: True}


@cache
def _conv_bases() -> dict:
    """The convolution classes _FastConv computes, each with its class attributes: nn.Conv2d,
    and timm's Conv2dSame (EfficientNet-Lite's stride-2 convolutions), ScaledStdConv2d and
    ScaledStdConv2dSame (NFNet's). Exact types, as for the batch norms."""
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame

    return {nn.Conv2d: {}, Conv2dSame: {"same": True}, ScaledStdConv2d: {"standardised": True},
            ScaledStdConv2dSame: {"standardised": True}}


def _fast_class(mod):
    """The drop-in class for a module of the unrolled tail, or None to keep it."""
    cls = type(mod)
    if cls not in _FAST:
        if cls is nn.Conv2d:
            _FAST[cls] = _GemmConv2d
        elif cls in _conv_bases():
            _FAST[cls] = type(f"_Fast{cls.__name__}", (_FastConv, cls), _conv_bases()[cls])
        elif cls in _affine_bases():
            _FAST[cls] = type(f"_Affine{cls.__name__}", (_AffineBatchNorm, cls),
                              {"activates": _affine_bases()[cls]})
        else:
            _FAST[cls] = None
    return _FAST[cls]


_FAST: dict = {}


# (convolution, batch norm) attribute pairs of timm's EfficientNet / MobileNet classes whose
# forward feeds the convolution's output to the batch norm and to nothing else
_FOLDS = {"EfficientNet": (("conv_stem", "bn1"), ("conv_head", "bn2")),
          "DepthwiseSeparableConv": (("conv_s2d", "bn_s2d"), ("conv_dw", "bn1"),
                                     ("conv_pw", "bn2")),
          "InvertedResidual": (("conv_s2d", "bn_s2d"), ("conv_pw", "bn1"), ("conv_dw", "bn2"),
                               ("conv_pwl", "bn3"))}


def fold_norms(module):
    """Fold each eval-mode batch norm's scale into the convolution before it: conv(x, w) * s
    + t = conv(x, w * s) + t. The batch norm then no longer keeps the convolution's output for
    its own backward (one activation less per pair in every unrolled step), and its multiply
    is gone. Pairs: the named ones of _FOLDS, and consecutive children of a Sequential; both
    modules must be fast-path ones (the convolution with zero padding)."""
    for mod in module.modules():
        names = _FOLDS.get(type(mod).__name__, ()) if type(mod).__module__.startswith(
            "timm.") else ()
        pairs = [(getattr(mod, a, None), getattr(mod, b, None)) for a, b in names]
        if type(mod) is nn.Sequential:
            kids = list(mod.children())
            pairs += list(zip(kids, kids[1:]))
        for conv, norm in pairs:
            if isinstance(conv, _FastConv) and isinstance(norm, _AffineBatchNorm) \
                    and conv.padding_mode == "zeros" and not norm.folded:
                conv.__dict__["_folded_norm"] = norm     # not a submodule: names unchanged
                norm.folded = True


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
        fold_norms(fast)
        cached = (tail, where, fast, list(zip(tail.modules(), fast.modules())))
        model._unroll_tail = cached
    for a, b in cached[3]:
        b.training = a.training
    return cached[2], dict(tail.named_buffers())
