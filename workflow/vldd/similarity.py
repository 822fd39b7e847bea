"""LoRS (Xu et al., ICML 2024): a learned image-text similarity matrix S over the distilled
pairs, used as the soft targets of the contrastive loss instead of the identity.

Two parametrisations (distill.lors.similarity):

- ``lowrank``: S = diag(a) + (alpha / r) L R^T with a in R^N, L, R in R^{N x r};
  a = 1, L ~ N(0, 1), R = 0 at the start, so S starts as the identity (LoRA-style).
- ``full``: S itself, an N x N matrix starting as the identity.

A mini-batch of pairs `idx` trains against the block S[idx][:, idx]. The parameters are
stored in the pair set (group /similarity) and evaluate trains with them.
"""
from __future__ import annotations

import numpy as np
import torch

from .errors import VlddError

KINDS = ("lowrank", "full")


class Similarity:
    """The learnable leaves of S (`params`, in a fixed order: lowrank a, L, R; full S)."""

    def __init__(self, kind: str, params: list, alpha: float = 1.0):
        if kind not in KINDS:
            raise VlddError(f"similarity kind '{kind}' is unknown: choose one of "
                            f"{', '.join(KINDS)}.")
        self.kind, self.params, self.alpha = kind, list(params), float(alpha)

    @classmethod
    def identity(cls, n: int, kind: str = "lowrank", rank: int = 10, alpha: float = 1.0,
                 seed: int = 0, device=None):
        """S = I: lowrank with a = 1, L ~ N(0, 1) (from `seed`), R = 0; or full I."""
        if kind == "full":
            return cls(kind, [torch.eye(n, device=device)], alpha)
        g = torch.Generator().manual_seed(int(seed))
        left = torch.randn(n, int(rank), generator=g)
        return cls(kind, [torch.ones(n, device=device), left.to(device),
                          torch.zeros(n, int(rank), device=device)], alpha)

    @property
    def n(self) -> int:
        return len(self.params[0])

    @property
    def rank(self) -> int:
        return self.params[1].shape[1] if self.kind == "lowrank" else self.n

    def requires_grad_(self, flag: bool = True):
        for p in self.params:
            p.requires_grad_(flag)
        return self

    def block(self, idx):
        """S[idx][:, idx], differentiable w.r.t. the parameters."""
        if self.kind == "full":
            return self.params[0][idx][:, idx]
        a, left, right = self.params
        return torch.diag(a[idx]) + (self.alpha / self.rank) * left[idx] @ right[idx].t()

    def matrix(self):
        return self.block(torch.arange(self.n, device=self.params[0].device))

    # the pair set's /similarity group
    NAMES = {"lowrank": ("diag", "left", "right"), "full": ("matrix",)}

    def arrays(self) -> dict:
        return {name: p.detach().cpu().numpy().astype(np.float32)
                for name, p in zip(self.NAMES[self.kind], self.params)}
