"""The pair set (HDF5, schema vldd/pairset): any small training set of image-text pairs.

Distilled sets and coresets share it, so `evaluate` treats them alike. Layout::

    /images       float32 [N, 3, H, W]  in the image encoder's normalised pixel space
    /texts        float32 [N, d]        sentence embeddings (the text head's input)
    /caption_ids  int64 [N]             the real caption each pair came from (-1: noise)
    /init/...     (distilled sets) the images and texts before distillation
    attrs         provenance, kind (distilled | coreset), method, budget, image_mean,
                  image_std, lr_image, lr_text (learned lrs; NaN when there are none)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import VlddError
from .io import h5_dataset, h5_writer, open_h5


@dataclass
class PairSet:
    images: np.ndarray
    texts: np.ndarray
    caption_ids: np.ndarray
    kind: str
    method: str
    mean: tuple
    std: tuple
    lr_image: float = float("nan")
    lr_text: float = float("nan")
    init_images: np.ndarray | None = None
    init_texts: np.ndarray | None = None
    attrs: dict = field(default_factory=dict)

    @property
    def budget(self):
        return len(self.images)


def write_pairset(path, ps: PairSet, prov: dict):
    attrs = dict(prov)
    attrs.update(kind=ps.kind, method=ps.method, budget=ps.budget,
                 image_mean=np.asarray(ps.mean, dtype=np.float64),
                 image_std=np.asarray(ps.std, dtype=np.float64),
                 lr_image=float(ps.lr_image), lr_text=float(ps.lr_text))
    if "selected_iteration" in ps.attrs:   # distilled: the iteration whose data this is
        attrs["selected_iteration"] = int(ps.attrs["selected_iteration"])
    with h5_writer(path, attrs) as f:
        h5_dataset(f, "images", np.asarray(ps.images, dtype=np.float32))
        h5_dataset(f, "texts", np.asarray(ps.texts, dtype=np.float32))
        h5_dataset(f, "caption_ids", np.asarray(ps.caption_ids, dtype=np.int64))
        if ps.init_images is not None:
            g = f.create_group("init")
            h5_dataset(g, "images", np.asarray(ps.init_images, dtype=np.float32))
            h5_dataset(g, "texts", np.asarray(ps.init_texts, dtype=np.float32))


def read_pairset(path) -> PairSet:
    with open_h5(path, "pairset") as f:
        try:
            a = dict(f.attrs)
            init = f.get("init")
            return PairSet(
                images=f["images"][()], texts=f["texts"][()], caption_ids=f["caption_ids"][()],
                kind=str(a["kind"]), method=str(a["method"]),
                mean=tuple(a["image_mean"]), std=tuple(a["image_std"]),
                lr_image=float(a["lr_image"]), lr_text=float(a["lr_text"]),
                init_images=None if init is None else init["images"][()],
                init_texts=None if init is None else init["texts"][()], attrs=a)
        except (KeyError, OSError, ValueError, TypeError) as exc:
            raise VlddError(f"{path}: damaged pair set ({exc}). Delete it and rerun the stage "
                            "that made it (distill or select_coreset).") from exc


def check_pairset(path, ps: PairSet) -> None:
    """Refuse a pair set whose arrays do not fit together or hold NaN/inf."""
    n = len(ps.images)
    fix = "Delete it and rerun the stage that made it (distill or select_coreset)."
    if ps.images.ndim != 4 or ps.images.shape[1] != 3 or ps.texts.ndim != 2 \
            or len(ps.texts) != n or len(ps.caption_ids) != n:
        raise VlddError(f"{path}: images {ps.images.shape}, texts {ps.texts.shape} and "
                        f"caption_ids {ps.caption_ids.shape} do not make {n} pairs. {fix}")
    for name, arr in (("images", ps.images), ("texts", ps.texts)):
        if not np.isfinite(arr).all():
            raise VlddError(f"{path}: {name} hold NaN or inf ({int((~np.isfinite(arr)).sum())} "
                            f"values): this pair set cannot be trained on. {fix}")


def check_budget(prepared, budget: int, where: str = "budget") -> int:
    """The number of training images, after refusing a budget that does not fit in it."""
    n = len(prepared.split_images("train"))
    if budget > n:
        raise VlddError(f"{where} = {budget} is larger than the training set "
                        f"({n} images): choose a budget <= {n}.")
    if budget < 1:
        raise VlddError(f"{where} = {budget}: a coreset needs at least one pair.")
    return n


def random_pairs(prepared, budget: int, seed: int, where: str = "budget") -> np.ndarray:
    """Caption ids of `budget` training pairs: distinct images, one random caption each."""
    check_budget(prepared, budget, where)
    train_images = prepared.split_images("train")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(train_images, size=budget, replace=False))
    caps = prepared.captions
    out = []
    for img in chosen:
        ids = caps.loc[caps["image_index"] == img, "caption_id"].to_numpy()
        out.append(int(ids[rng.integers(len(ids))]))
    return np.asarray(out, dtype=np.int64)


