"""The candidate pool of the herding and k-center coresets: every training pair with its
joint embedding [L2(image feature); L2(text feature)] under a trained expert, held so that its
memory grows with the pairs' text half only (the image half once per image, the text half in
float16; vldd.model.embed_pairs computes them), and the products those selections need,
computed a chunk of rows at a time."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Pool:
    """The candidates: every training pair, in the order of the prepared captions.

    caption_ids[p] is pair p's caption and image_ids[p] its image (image_index). With the
    joint embedding (herding, kcenter), pair p's row is [img[pair_row[p]]; txt[p]]: the image
    half is kept once per image and the text half in float16 (unit rows: about 3 significant
    digits), so that the pool holds 2 bytes per text dimension and pair instead of 8. Its
    products are computed in float32, a chunk of rows at a time.
    """
    caption_ids: np.ndarray
    image_ids: np.ndarray
    img: torch.Tensor | None = None        # [n_images, D] float32
    pair_row: torch.Tensor | None = None   # [n_pairs] row of img
    txt: torch.Tensor | None = None        # [n_pairs, D] float16

    CHUNK = 65536

    def __len__(self):
        return len(self.caption_ids)

    def _txt_chunks(self):
        for s in range(0, len(self.txt), self.CHUNK):
            yield s, self.txt[s:s + self.CHUNK].float()

    @property
    def x(self) -> torch.Tensor:
        """The whole joint embedding [n_pairs, 2D] float32 (for checks on small pools)."""
        return torch.cat([self.img[self.pair_row], self.txt.float()], dim=1)

    def rows(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx, device=self.txt.device).reshape(-1)
        return torch.cat([self.img[self.pair_row[idx]], self.txt[idx].float()], dim=1)

    def matmul(self, m: torch.Tensor) -> torch.Tensor:
        """x @ m for m [2D] or [2D, k]."""
        d = self.img.shape[1]
        out = (self.img @ m[:d])[self.pair_row]
        for s, t in self._txt_chunks():
            out[s:s + len(t)] += t @ m[d:]
        return out

    def sq(self) -> torch.Tensor:
        """|x_p|^2 per pair."""
        out = self.img.pow(2).sum(1)[self.pair_row]
        for s, t in self._txt_chunks():
            out[s:s + len(t)] += t.pow(2).sum(1)
        return out

    def total(self) -> torch.Tensor:
        """sum_p x_p in float64."""
        counts = torch.bincount(self.pair_row, minlength=len(self.img)).double()
        txt = sum((t.sum(0, dtype=torch.float64) for _, t in self._txt_chunks()),
                  torch.zeros(self.txt.shape[1], dtype=torch.float64, device=self.txt.device))
        return torch.cat([counts @ self.img.double(), txt])
