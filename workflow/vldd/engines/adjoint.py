"""The engines that propagate the adjoint lambda_k = dL/dtheta_k by hand, recomputing the
steps instead of keeping their graphs: checkpointed (exact) and constant-memory (TESLA).

Both run a forward pass without a graph, then recompute step k with one and take its
vector-Jacobian product with lr * lambda_{k+1} (_Replay.vjp); checkpointed carries lambda back
through the Hessian-vector products, constant-memory keeps lambda_K. They replay each step's
dropout masks and leave the generators where exact leaves them.
"""
from __future__ import annotations

import math

import torch

from ..losses import GROUPS, matching_loss
from .inner import Unroll, distilled_trunk_features

TRUNK_CHUNK = 16   # images per trunk recomputation in the recomputing engines
SNAPSHOT_BYTES = 256 * 2**20   # checkpointed keeps every step's parameters up to this much


def _rng_get(device):
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _rng_set(state, device):
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


class _Replay:
    """What a recomputing engine needs to redo step k exactly: the trunk features (no graph),
    the mini-batches, the lrs (detached), the dropout generator state before each step; and
    dL/dfeats, dL/dtexts, which its reverse pass accumulates (begin_reverse allocates them)."""

    def __init__(self, u: Unroll, pixels, texts, lr_img, lr_txt):
        with torch.no_grad():
            self.feats = distilled_trunk_features(u.model, pixels, u.opts, grad=False)
        self.u, self.texts, self.device = u, texts, texts.device
        self.idx = u.batches(len(texts), texts.device)
        self.lrs = (lr_img.detach(), lr_txt.detach())
        self.theta0 = (u.theta0["image"].detach(), u.theta0["text"].detach())
        self.rng = []
        self.dfeats = self.dtexts = None
        self.dsim = None

    def grad(self, k, th, create_graph=False):
        """(g_i, g_t, feats_b, texts_b) of step k at th = (th_i, th_t) (leaves)."""
        _rng_set(self.rng[k], self.device)
        b = self.idx[k]
        fb = self.feats[b].detach().requires_grad_(create_graph)
        tb = self.texts[b].detach().requires_grad_(create_graph and self.texts.requires_grad)
        loss = self.u.step_loss(th[0], th[1], fb, tb, b)
        g_i, g_t = torch.autograd.grad(loss, list(th), create_graph=create_graph,
                                       allow_unused=True)
        if g_i is None:
            g_i = torch.zeros_like(th[0])
        return g_i, g_t, fb, tb

    def record_rng(self, k):
        """The dropout generator's state before step k, the first time step k runs."""
        if k == len(self.rng):
            self.rng.append(_rng_get(self.device))

    def forward(self, k, th_data):
        """theta_{k+1} (no graph) from theta_k and g_k; records the rng state of step k."""
        self.record_rng(k)
        th = tuple(t.detach().requires_grad_(True) for t in th_data)
        with torch.enable_grad():
            g_i, g_t, _, _ = self.grad(k, th)
        lrs = self.lrs
        with torch.no_grad():
            return (th_data[0] - lrs[0] * g_i, th_data[1] - lrs[1] * g_t), (g_i, g_t)

    def begin_reverse(self):
        self.dfeats = torch.zeros_like(self.feats)
        self.dtexts = torch.zeros_like(self.texts)
        self.dsim = [torch.zeros_like(p) for p in self.u.leaves()]

    def step_graph(self, k, th_data):
        """Step k at theta_k = th_data with its graph: (theta_k leaves, g_i, g_t, feats_b,
        texts_b)."""
        self.record_rng(k)
        th = tuple(t.detach().requires_grad_(True) for t in th_data)
        with torch.enable_grad():
            return (th, *self.grad(k, th, create_graph=True))

    def vjp(self, k, th_data, lam, need_hv, graph=None):
        """Step k recomputed with a graph at theta_k = th_data (or its `graph` from
        step_graph): returns (g_k, H_k (lr * lam), or None unless need_hv) and accumulates
        -(dg_k/dX)^T (lr * lam) into dfeats, dtexts (and dsim, for the similarity's
        parameters)."""
        lrs = self.lrs
        th, g_i, g_t, fb, tb = graph or self.step_graph(k, th_data)
        with torch.enable_grad():
            s = (g_i * (lrs[0] * lam[0])).sum() + (g_t * (lrs[1] * lam[1])).sum()
            inputs = ([th[0], th[1]] if need_hv else []) + [fb] + ([tb] if tb.requires_grad
                                                                  else []) + self.u.leaves()
            out = torch.autograd.grad(s, inputs, allow_unused=True)
        out = list(out)
        hv = (out.pop(0), out.pop(0)) if need_hv else None
        d_fb = out.pop(0)
        d_tb = out.pop(0) if tb.requires_grad else None
        for acc, d in zip(self.dsim, out):
            if d is not None:
                acc.sub_(d)
        b = self.idx[k]
        if d_fb is not None:
            self.dfeats.index_add_(0, b, d_fb, alpha=-1.0)
        if d_tb is not None:
            self.dtexts.index_add_(0, b, d_tb, alpha=-1.0)
        return (g_i.detach(), g_t.detach()), hv

    def gradients(self, pixels, lr_img, lr_txt, d_lr):
        """[dL/dpixels, dL/dtexts, dL/dlr_img, dL/dlr_txt, *dL/dsimilarity] from the
        accumulated dfeats, dtexts, dsim and d_lr (dL/dlr per group)."""
        g_pix = self._pixel_grad(pixels)
        g_lr_i, g_lr_t = _lr_grads(lr_img, lr_txt, d_lr, self.u.theta0["image"].numel() > 0)
        return [g_pix, self.dtexts if self.texts.requires_grad else None, g_lr_i, g_lr_t,
                *self.dsim]

    def _pixel_grad(self, pixels):
        """dL/dpixels from dL/dfeats: the trunk recomputed with a graph, TRUNK_CHUNK images at
        a time (it is per image: batch norms run on running statistics), so that its
        activations never all live at once."""
        if not pixels.requires_grad:
            return None
        if self.feats is pixels:
            return self.dfeats
        out = []
        for i in range(0, len(pixels), TRUNK_CHUNK):
            part = pixels[i:i + TRUNK_CHUNK].detach().requires_grad_(True)
            with torch.enable_grad():
                again = distilled_trunk_features(self.u.model, part, self.u.opts, grad=True)
                (g,) = torch.autograd.grad(
                    again, [part], grad_outputs=self.dfeats[i:i + TRUNK_CHUNK].to(again.dtype))
            out.append(g)
        return torch.cat(out) if out else torch.zeros_like(pixels)


def _lr_grads(lr_img, lr_txt, d_lr, image_unrolled):
    """The lr gradients in the lrs' dtype and shape; None where an lr does not require grad,
    and for the image lr when the image group is empty (it steps nothing)."""
    g_i = d_lr[0].to(lr_img.dtype).reshape(lr_img.shape) if image_unrolled else None
    g_t = d_lr[1].to(lr_txt.dtype).reshape(lr_txt.shape)
    return (g_i if lr_img.requires_grad else None), (g_t if lr_txt.requires_grad else None)


def _adjoint_end(u: Unroll, theta_end):
    """L(theta_K) and lambda_K = dL/dtheta_K."""
    th = {g: theta_end[i].detach().requires_grad_(True) for i, g in enumerate(GROUPS)}
    with torch.enable_grad():
        loss = matching_loss(th, u.theta0, u.target, GROUPS, terms=u.terms)
        if not torch.is_tensor(loss):
            loss = torch.zeros((), device=u.theta0["text"].device)
            lam = tuple(torch.zeros_like(th[g]) for g in GROUPS)
        else:
            lam = tuple(torch.autograd.grad(loss, [th[g]], allow_unused=True)[0]
                        for g in GROUPS)
            lam = tuple(torch.zeros_like(th[g]) if l is None else l
                        for g, l in zip(GROUPS, lam))
    return loss.detach(), lam


def default_segment(syn_steps: int, theta) -> int:
    """Steps per snapshot when distill.segment_steps is null: 1 (every step's parameters kept,
    no step recomputed) while those syn_steps snapshots take at most SNAPSHOT_BYTES, else
    ceil(sqrt(syn_steps)) (memory in sqrt(K) snapshots, about K more steps recomputed)."""
    size = sum(t.numel() * t.element_size() for t in theta)
    if syn_steps * size <= SNAPSHOT_BYTES:
        return 1
    return max(1, math.ceil(math.sqrt(syn_steps)))


def checkpointed(u: Unroll, pixels, texts, lr_img, lr_txt):
    """The exact gradient: snapshots every `segment` steps in the forward pass, each segment
    recomputed in the reverse pass, lambda carried back through H_k. The forward pass takes
    its last step with the graph, which the reverse pass then starts from (one step fewer
    recomputed; the peak is one step's graph either way)."""
    replay = _Replay(u, pixels, texts, lr_img, lr_txt)
    K, th = u.syn_steps, replay.theta0
    seg = u.opts.segment or default_segment(K, th)
    snaps, last = {}, None
    for k in range(K):
        if k % seg == 0:
            snaps[k] = th
        if k < K - 1:
            th, _ = replay.forward(k, th)
        else:   # the last step keeps its graph: the reverse pass starts with it, not again
            last = replay.step_graph(k, th)
            with torch.no_grad():
                th = (th[0] - replay.lrs[0] * last[1], th[1] - replay.lrs[1] * last[2])
    rng_after = _rng_get(replay.device)
    loss, lam = _adjoint_end(u, th)
    replay.begin_reverse()
    d_lr = [torch.zeros((), device=texts.device, dtype=th[1].dtype) for _ in GROUPS]
    for start in reversed(range(0, K, seg)):
        stop = min(start + seg, K)
        inside = [snaps.pop(start)]
        for k in range(start, stop - 1):       # the segment's snapshots, recomputed
            nxt, _ = replay.forward(k, inside[-1])
            inside.append(nxt)
        for k in reversed(range(start, stop)):
            g, hv = replay.vjp(k, inside.pop(), lam, need_hv=True,
                               graph=last if k == K - 1 else None)
            with torch.no_grad():
                d_lr[0] -= (g[0] * lam[0]).sum()
                d_lr[1] -= (g[1] * lam[1]).sum()
                lam = (lam[0] - hv[0] if hv[0] is not None else lam[0],
                       lam[1] - hv[1] if hv[1] is not None else lam[1])
    _rng_set(rng_after, replay.device)
    return loss, replay.gradients(pixels, lr_img, lr_txt, d_lr)


def constant_memory(u: Unroll, pixels, texts, lr_img, lr_txt):
    """The TESLA gradient: lambda_k frozen at lambda_K. A forward pass summing the g_k (for the
    lr gradients), then a second forward pass taking each step's VJP with lambda_K."""
    replay = _Replay(u, pixels, texts, lr_img, lr_txt)
    th = replay.theta0
    G = [torch.zeros_like(t) for t in th]
    for k in range(u.syn_steps):
        th, g = replay.forward(k, th)
        G[0] += g[0]
        G[1] += g[1]
    rng_after = _rng_get(replay.device)
    loss, lam = _adjoint_end(u, th)
    d_lr = [-(G[0] * lam[0]).sum(), -(G[1] * lam[1]).sum()]
    del G
    replay.begin_reverse()
    th, lrs = replay.theta0, replay.lrs
    for k in range(u.syn_steps):   # second pass, forward again: lambda_k := lambda_K
        g, _ = replay.vjp(k, th, lam, need_hv=False)
        with torch.no_grad():
            th = (th[0] - lrs[0] * g[0], th[1] - lrs[1] * g[1])
    _rng_set(rng_after, replay.device)
    return loss, replay.gradients(pixels, lr_img, lr_txt, d_lr)
