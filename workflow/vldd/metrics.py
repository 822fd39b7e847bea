"""Image-text retrieval recall.

TR@K (image -> text): an image counts as retrieved if any of its captions ranks in the top K;
averaged over images. IR@K (text -> image): a caption counts if its image ranks in the top K;
averaged over captions. Ties are counted against the model: a wrong candidate that scores
exactly as high as the right one ranks above it, so a collapsed model (all scores equal)
gets zero rather than perfect recall.
"""
from __future__ import annotations

import numpy as np

from .errors import VlddError

KS = (1, 5, 10)
METRIC_ORDER = tuple(f"TR@{k}" for k in KS) + tuple(f"IR@{k}" for k in KS)


def retrieval_ranks(scores: np.ndarray, txt2img: np.ndarray):
    """Ranks (0 = best) of the right answer for each image (TR) and each caption (IR).

    scores: [n_images, n_captions] similarities; txt2img[t] = the image of caption t.
    """
    scores = np.asarray(scores, dtype=np.float64)
    txt2img = np.asarray(txt2img, dtype=np.int64)
    if not np.isfinite(scores).all():   # NaN compares false: it would rank first
        raise VlddError(f"retrieval scores hold {int((~np.isfinite(scores)).sum())} NaN/inf "
                        f"values of {scores.size}: the model's features are not finite (its "
                        "training diverged). Lower the learning rates of this stage.")
    n_img, n_txt = scores.shape
    if txt2img.shape != (n_txt,):
        raise ValueError(f"txt2img has shape {txt2img.shape}, expected ({n_txt},)")
    own = np.zeros_like(scores, dtype=bool)
    own[txt2img, np.arange(n_txt)] = True
    # TR: best score among an image's own captions, against every other caption.
    best_own = np.where(own, scores, -np.inf).max(axis=1)
    tr_rank = (np.where(own, -np.inf, scores) >= best_own[:, None]).sum(axis=1)
    # An image without captions is never retrieved: a rank no K reaches (n_txt would
    # count as a hit for every K > n_txt, e.g. TR@10 on a set of fewer than 10 captions).
    tr_rank[~own.any(axis=1)] = np.iinfo(tr_rank.dtype).max
    # IR: the caption's own image against every other image.
    right = scores[txt2img, np.arange(n_txt)]
    ir_rank = (np.where(own, -np.inf, scores) >= right[None, :]).sum(axis=0)
    return tr_rank, ir_rank


def recall(scores, txt2img, ks=KS) -> dict:
    """{'TR@1': ..., 'IR@10': ...} in percent."""
    tr_rank, ir_rank = retrieval_ranks(scores, txt2img)
    out = {}
    for k in ks:
        out[f"TR@{k}"] = 100.0 * float(np.mean(tr_rank < k))
    for k in ks:
        out[f"IR@{k}"] = 100.0 * float(np.mean(ir_rank < k))
    return out
