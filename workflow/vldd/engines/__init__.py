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

  Memory: one step's graph plus K/segment + segment snapshots (by default segment 1, no
  step recomputed, while the K snapshots take at most 256 MiB: adjoint.default_segment), and
  the trunk recomputed in chunks of TRUNK_CHUNK images for the pixel gradient; time: about
  one extra gradient evaluation per step.
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

The modules: inner (the Unroll, i.e. one iteration's inner problem, its step loss and the
differentiable unroll that exact and heads-only share), bptt (exact, heads-only), adjoint
(checkpointed, constant-memory), fastpath (the copy of the tail every engine evaluates: 1x1
and depthwise convolutions on small maps as matrix products and eval-mode batch norms as an
affine map, whose double backward is several times cheaper on CPU).

Every engine draws the mini-batches from the Unroll's `gen` and the dropout masks from the
global torch generator in the same order as ``exact``; the recomputing engines replay the
dropout masks of each step and leave the generators where ``exact`` leaves them, so switching
engines changes nothing but the gradient's arithmetic (and, for constant-memory, its
approximation).
"""
from __future__ import annotations

import torch

from ..errors import VlddError
from .adjoint import checkpointed, constant_memory
from .bptt import exact, heads_only, is_adapter_layout
from .fastpath import unroll_tail
from .inner import EngineOptions, Unroll, distilled_trunk_features, unroll

__all__ = ["ENGINES", "EngineOptions", "Unroll", "apply_backend", "check_engine",
           "distilled_trunk_features", "is_adapter_layout", "meta_gradient", "unroll",
           "unroll_tail"]

ENGINES = ("exact", "checkpointed", "constant-memory", "heads-only")

_IMPL = {"exact": exact, "checkpointed": checkpointed, "constant-memory": constant_memory,
         "heads-only": heads_only}


def check_engine(name: str, allow_auto: bool = False):
    """A known engine (or, with allow_auto, distill.engine's auto: vldd.engines.memory)."""
    if name not in ENGINES and not (allow_auto and name == "auto"):
        raise VlddError(f"distill.engine '{name}' is unknown: choose one of "
                        f"{', '.join(ENGINES + (('auto',) if allow_auto else ()))}.")


def apply_backend(opts: EngineOptions, model, device: torch.device):
    """Process-wide backend switches and the trunk's memory format (once per run)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = bool(opts.tf32)
        torch.backends.cudnn.allow_tf32 = bool(opts.tf32)
        if opts.channels_last:
            model.tower.trunk.to(memory_format=torch.channels_last)
    if opts.autocast not in ("none", "bf16"):
        raise VlddError(f"distill.autocast '{opts.autocast}' must be none or bf16.")


def meta_gradient(engine: str, u: Unroll, pixels, texts, lr_img, lr_txt):
    """(matching loss, [dL/dpixels, dL/dtexts, dL/dlr_img, dL/dlr_txt, *dL/dS]) of one
    iteration of the inner problem `u`, by `engine` (dL/dS: the gradients of the parameters
    of u.similarity, LoRS's learned similarity matrix, when it has one).

    pixels: distilled images in the trunk's input space; texts: distilled sentence
    embeddings; lr_img, lr_txt: the student's lrs. A gradient is None where the input does not
    require grad or the loss does not depend on it. The loss is a detached 0-dim tensor (no
    host sync here); u.terms, when a dict, receives each encoder's normalised term of it.
    """
    check_engine(engine)
    return _IMPL[engine](u, pixels, texts, lr_img, lr_txt)
