"""The prepared store as the stages read it: images.h5 + captions.parquet (written by the
prepare_dataset stage) and the cached caption embeddings (written by embed_captions), each
checked against the files it must belong with."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import io
from .errors import VlddError
from .config import text_spec
from .io import config_hash, open_h5, sha256_file

SPLITS = ("train", "val", "test")
SPLIT_CODE = {"train": 0, "val": 1, "test": 2, "restval": 0}  # restval is training data
CAPTION_COLUMNS = ["caption_id", "image_index", "split", "caption", "raw"]


class H5Rows:
    """The rows of one HDF5 dataset (the prepared images, uint8 [N, H, W, 3]; the caption
    embeddings, [N, d]), read on demand: indexing with an int, a slice or an array of indices
    (any order, repeats allowed) reads those rows only, so a job's memory follows the rows it
    uses, not the dataset's size. view(indices) is a lazy subset that reads the same way (a
    split, batch by batch)."""

    def __init__(self, path, name, shape, dtype, fix=""):
        self.path, self.name, self.fix = Path(path), name, fix
        self.shape, self.dtype = tuple(int(x) for x in shape), np.dtype(dtype)
        self._file = None

    ndim = property(lambda self: len(self.shape))

    def __len__(self):
        return self.shape[0]

    def _data(self):
        if self._file is None:   # one handle per store, opened at the first read
            import h5py
            self._file = h5py.File(self.path, "r")
        return self._file[self.name]

    def __getitem__(self, key):
        if isinstance(key, tuple):
            return self[key[0]][(slice(None),) * (not np.isscalar(key[0])) + key[1:]]
        if isinstance(key, (int, np.integer, slice)):
            return self._read(lambda data: data[key])
        return self.rows(key)

    def _read(self, read):
        """read(dataset), a damaged file reported as one clear error (the rows are read
        when they are used, not when the store is opened)."""
        try:
            return read(self._data())
        except OSError as exc:
            raise VlddError(f"{self.path}: damaged {self.name} ({exc}). {self.fix}") from exc

    def rows(self, indices) -> np.ndarray:
        """The rows at `indices` (or where a boolean mask is true), in their order: runs of
        consecutive rows are read with one slice each."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64).reshape(-1)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"{self.path}: {self.name} row out of range 0..{len(self) - 1}")
        idx = np.where(idx < 0, idx + len(self), idx)
        unique, inverse = np.unique(idx, return_inverse=True)
        out = np.empty((len(unique), *self.shape[1:]), self.dtype)
        cuts = np.flatnonzero(np.diff(unique) != 1) + 1

        def read(data):
            for a, b in zip(np.r_[0, cuts], np.r_[cuts, len(unique)]) if len(unique) else ():
                data.read_direct(out, np.s_[unique[a]:unique[b - 1] + 1], np.s_[a:b])
        self._read(read)
        return out[inverse.reshape(-1)]

    def view(self, indices) -> "RowView":
        return RowView(self, indices)

    def __array__(self, dtype=None, copy=None):
        out = self._read(lambda data: data[()])
        return out if dtype is None else out.astype(dtype)


class RowView:
    """Rows `indices` of an H5Rows, read only when indexed (row k is the store's
    indices[k])."""

    def __init__(self, store: H5Rows, indices):
        self.store, self.indices = store, np.asarray(indices, dtype=np.int64)
        self.shape = (len(self.indices), *store.shape[1:])
        self.dtype = store.dtype

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)):
            return self.store[int(self.indices[key])]
        return self.store.rows(self.indices[key])

    def __array__(self, dtype=None, copy=None):
        out = self.store.rows(self.indices)
        return out if dtype is None else out.astype(dtype)


@dataclass
class Prepared:
    """A prepared dataset: captions and splits in memory, images read on demand."""
    images: H5Rows            # uint8 [N, H, W, 3], read on demand
    image_split: np.ndarray   # str per image: train / val / test
    captions: pd.DataFrame    # CAPTION_COLUMNS, ordered by image then caption
    filenames: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

    def split_images(self, split: str) -> np.ndarray:
        """Indices (ascending) of the images of `split`; empty if the split has none."""
        if split not in SPLITS:
            raise VlddError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")
        return np.flatnonzero(self.image_split == split).astype(np.int64)

    def split_captions(self, split: str) -> pd.DataFrame:
        if split not in SPLITS:
            raise VlddError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}.")
        return self.captions[self.captions["split"] == split].reset_index(drop=True)

    def retrieval_maps(self, split: str):
        """(image_indices, caption_ids, txt2img): txt2img[t] is the position within
        image_indices of the image of the split's t-th caption."""
        image_indices = self.split_images(split)
        caps = self.split_captions(split)
        caption_ids = caps["caption_id"].to_numpy(np.int64)
        txt2img = np.searchsorted(image_indices, caps["image_index"].to_numpy(np.int64))
        return image_indices, caption_ids, txt2img.astype(np.int64)


def load_prepared(data_dir) -> Prepared:
    """Read a store written by prepare_dataset, checking that its two files belong together."""
    data_dir = Path(data_dir)
    h5_path, cap_path = data_dir / "images.h5", data_dir / "captions.parquet"
    fix = "Delete the data folder and rerun the prepare stage."
    with io.open_h5(h5_path, expected_schema="images") as f:
        try:
            images = f["images"]
            shape, dtype = images.shape, images.dtype
            codes = f["split"][:]
            filenames = np.asarray(f["filename"].asstr()[:], dtype=object)
        except (KeyError, OSError, TypeError) as exc:
            raise VlddError(f"{h5_path}: missing or damaged dataset ({exc}). {fix}") from exc
        images_hash = f.attrs.get("config_sha256", "")
    n = shape[0]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 \
            or codes.shape != (n,) or filenames.shape != (n,) or codes.max(initial=0) > 2:
        raise VlddError(f"{h5_path}: images/split/filename do not match the vldd layout. {fix}")
    if not cap_path.is_file():
        raise VlddError(f"{cap_path}: file not found. {fix}")
    try:
        captions = pd.read_parquet(cap_path)
        meta = io.read_parquet_meta(cap_path)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise VlddError(f"{cap_path}: not a readable Parquet file ({exc}). {fix}") from exc
    if list(captions.columns) != CAPTION_COLUMNS:
        raise VlddError(f"{cap_path}: columns {list(captions.columns)}, expected "
                        f"{CAPTION_COLUMNS}. {fix}")
    if meta.get("config_sha256") != images_hash:
        raise VlddError(f"{cap_path} and {h5_path} come from different prepare runs. {fix}")
    image_split = np.array(SPLITS)[codes]
    idx = captions["image_index"].to_numpy(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= n
                     or (image_split[idx] != captions["split"].to_numpy()).any()):
        raise VlddError(f"{cap_path}: image_index/split disagree with {h5_path}. {fix}")
    return Prepared(H5Rows(h5_path, "images", shape, dtype, fix), image_split, captions,
                    filenames)


def load_embeddings(path, data_dir, text_cfg: dict | None = None) -> H5Rows:
    """The cached embeddings [n_captions, d], read on demand (H5Rows: index them with caption
    ids), after checking that they belong to this caption file (and, given `text_cfg`, to
    this text encoder)."""
    captions_path = Path(data_dir) / "captions.parquet"
    with open_h5(path, "embeddings") as f:
        want = sha256_file(captions_path)
        if f.attrs.get("captions_sha256") != want:
            raise VlddError(f"{path}: computed from another captions file than {captions_path} "
                            "(stale cache). Delete it and rerun embed_captions.")
        if text_cfg is not None and f.attrs.get("config_sha256") != config_hash(text_spec(text_cfg)):
            raise VlddError(f"{path}: computed with another text encoder than "
                            f"model.text_encoder = {text_cfg} (stale cache). Delete it and rerun "
                            "embed_captions.")
        try:
            data = f["embeddings"]
            if data.ndim != 2:
                raise KeyError(f"embeddings of shape {data.shape}, expected 2 dimensions")
            return H5Rows(path, "embeddings", data.shape, data.dtype,
                          "Delete it and rerun embed_captions.")
        except (KeyError, OSError) as exc:
            raise VlddError(f"{path}: damaged embeddings ({exc}). Delete it and rerun "
                            "embed_captions.") from exc
