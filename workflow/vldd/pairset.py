"""The pair set (HDF5, schema vldd/pairset): any small training set of image-text pairs.

Distilled sets and coresets share it, so `evaluate` treats them alike. Layout::

    /images       float32 [N, 3, H, W]  in the image encoder's normalised pixel space
    /texts        float32 [N, d]        sentence embeddings (the text head's input)
    /caption_ids  int64 [N]             the real caption each pair came from (-1: noise)
    /init/...     (distilled sets) the images and texts before distillation
    /similarity/  (LoRS) the learned similarity matrix's parameters: diag, left, right
                  (lowrank) or matrix (full); attrs kind, alpha (vldd.similarity)
    /phases       int64 [N] (distill.phases, vldd.phases) each pair's phase; attrs
                  phase_lr_image, phase_lr_text hold each phase's learned lrs
    attrs         provenance, kind (distilled | coreset), method, budget (what the set
                  costs: N, or N + 1 pairs when one pays for /similarity), image_mean,
                  image_std, lr_image, lr_text (learned lrs; NaN when there are none), loss
                  (infonce, or wbce with /similarity: what evaluate trains with)
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
    nominal_budget: int | None = None     # the budget it was made for (None: its size)
    similarity: dict | None = None        # LoRS: {"kind", "alpha", "arrays": {name: array}}
    phases: np.ndarray | None = None      # distill.phases: each pair's phase, trained in order
    phase_lrs: np.ndarray | None = None   # [n_phases, 2]: each phase's (lr_image, lr_text)

    @property
    def budget(self):
        """What the set costs in pairs: its size, or the budget it was made for when it
        stores a similarity matrix paid for with pairs."""
        return len(self.images) if self.nominal_budget is None else int(self.nominal_budget)

    def similarity_matrix(self) -> np.ndarray | None:
        """LoRS's S as an [N, N] array (None without one)."""
        if self.similarity is None:
            return None
        arr = {k: np.asarray(v, dtype=np.float32) for k, v in self.similarity["arrays"].items()}
        if self.similarity["kind"] == "full":
            return arr["matrix"]
        scale = np.float32(self.similarity["alpha"] / arr["left"].shape[1])
        return np.diag(arr["diag"]) + scale * (arr["left"] @ arr["right"].T)

    @property
    def loss(self):
        """The inner loss evaluate trains with: LoRS's weighted BCE against S when the set
        holds one other than the identity; InfoNCE (whose targets are the identity)
        otherwise, so a set whose S stayed the identity trains as one without S."""
        m = self.similarity_matrix()
        if m is None or np.array_equal(m, np.eye(len(m), dtype=m.dtype)):
            return "infonce"
        return "wbce"


def write_pairset(path, ps: PairSet, prov: dict):
    attrs = dict(prov)
    attrs.update(kind=ps.kind, method=ps.method, budget=ps.budget,
                 image_mean=np.asarray(ps.mean, dtype=np.float64),
                 image_std=np.asarray(ps.std, dtype=np.float64),
                 lr_image=float(ps.lr_image), lr_text=float(ps.lr_text), loss=ps.loss)
    if "selected_iteration" in ps.attrs:   # distilled: the iteration whose data this is
        attrs["selected_iteration"] = int(ps.attrs["selected_iteration"])
    if ps.phase_lrs is not None:
        attrs["phase_lr_image"] = np.asarray(ps.phase_lrs, dtype=np.float64)[:, 0]
        attrs["phase_lr_text"] = np.asarray(ps.phase_lrs, dtype=np.float64)[:, 1]
    with h5_writer(path, attrs) as f:
        h5_dataset(f, "images", np.asarray(ps.images, dtype=np.float32))
        h5_dataset(f, "texts", np.asarray(ps.texts, dtype=np.float32))
        h5_dataset(f, "caption_ids", np.asarray(ps.caption_ids, dtype=np.int64))
        if ps.init_images is not None:
            g = f.create_group("init")
            h5_dataset(g, "images", np.asarray(ps.init_images, dtype=np.float32))
            h5_dataset(g, "texts", np.asarray(ps.init_texts, dtype=np.float32))
        if ps.similarity is not None:
            g = f.create_group("similarity")
            g.attrs["kind"] = str(ps.similarity["kind"])
            g.attrs["alpha"] = float(ps.similarity["alpha"])
            for name, arr in ps.similarity["arrays"].items():
                h5_dataset(g, name, np.asarray(arr, dtype=np.float32))
        if ps.phases is not None:
            h5_dataset(f, "phases", np.asarray(ps.phases, dtype=np.int64))


def read_pairset(path) -> PairSet:
    with open_h5(path, "pairset") as f:
        try:
            a = dict(f.attrs)
            init = f.get("init")
            sim = f.get("similarity")
            if sim is not None:
                sim = {"kind": str(sim.attrs["kind"]), "alpha": float(sim.attrs["alpha"]),
                       "arrays": {name: sim[name][()] for name in sim}}
            return PairSet(
                images=f["images"][()], texts=f["texts"][()], caption_ids=f["caption_ids"][()],
                kind=str(a["kind"]), method=str(a["method"]),
                mean=tuple(a["image_mean"]), std=tuple(a["image_std"]),
                lr_image=float(a["lr_image"]), lr_text=float(a["lr_text"]),
                init_images=None if init is None else init["images"][()],
                init_texts=None if init is None else init["texts"][()], attrs=a,
                nominal_budget=int(a["budget"]) if int(a["budget"]) != len(f["images"])
                else None, similarity=sim,
                phases=f["phases"][()] if "phases" in f else None,
                phase_lrs=None if "phases" not in f else
                np.stack([a["phase_lr_image"], a["phase_lr_text"]], axis=1))
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
    arrays = [("images", ps.images), ("texts", ps.texts)]
    if ps.similarity is not None:
        try:
            shape = ps.similarity_matrix().shape
        except (KeyError, IndexError, ValueError) as exc:
            raise VlddError(f"{path}: damaged similarity group ({exc}). {fix}") from exc
        if shape != (n, n):
            raise VlddError(f"{path}: the similarity parameters make an S of {shape}, which "
                            f"does not fit {n} pairs. {fix}")
        arrays += [(f"similarity/{k}", v) for k, v in ps.similarity["arrays"].items()]
    if ps.phases is not None:
        count = 0 if ps.phase_lrs is None else len(ps.phase_lrs)
        if len(ps.phases) != n or set(np.unique(ps.phases)) != set(range(count)):
            raise VlddError(f"{path}: phases {np.unique(ps.phases).tolist()} of {len(ps.phases)} "
                            f"pairs do not match the {count} phases' lrs. {fix}")
    for name, arr in arrays:
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


