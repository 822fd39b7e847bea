"""The expert trajectory store (HDF5, schema vldd/trajectory).

Layout::

    /                attrs: provenance (schema, versions, config hash, seed, encoder specs),
                            n_epochs, lr_image, lr_text
    /image/params    [n_epochs + 1, n_image_params] in experts.storage.dtype (float32,
                     float16, or bfloat16 as uint16 bits; attrs params_dtype,
                     params_compression, params_offsets), one chunk row per epoch; read
                     back as float32
    /image/base      [n_image_params], only with offsets: the initial parameters rounded to
                     the storage dtype; row e of params is then the offset of epoch e from
                     it (row 0: the rounding residual), and epoch e reads as base + row e
    /image/names     str [k]      parameter names, in module order
    /image/shapes    str [k]      JSON shape of each parameter
    /text/...        the same for the text head
    /metrics/loss    float64 [n_epochs]   mean training loss per epoch
    /metrics/val     float64 [n_epochs, 6] val TR/IR@1/5/10 after each epoch (NaN: no val split)

Row 0 is the model before training, row e the model after epoch e. The rows are written as
training goes, so a partial file can resume; the file is renamed into place when complete.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import h5py
import numpy as np
import torch

from .config import fill
from .errors import VlddError
from .io import h5_dataset, open_h5

GROUPS = ("image", "text")


def flatten(params) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in params]).float().cpu()


@dataclass
class ParamLayout:
    names: list
    shapes: list

    @classmethod
    def of(cls, module):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        return cls([n for n, _ in named], [tuple(p.shape) for _, p in named])

    @property
    def numels(self):
        return [int(np.prod(s)) if s else 1 for s in self.shapes]

    @property
    def size(self):
        return sum(self.numels)

    def unflatten(self, flat: torch.Tensor) -> dict:
        """Views of a flat vector, one per named parameter (differentiable)."""
        return {n: chunk.view(s) for n, chunk, s in
                zip(self.names, torch.split(flat, self.numels), self.shapes)}


# Storage of the parameter rows: dtype (bfloat16 is kept as its uint16 bit pattern) and
# HDF5 compression. Readers always get float32.
DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
COMPRESSION = ("none", "gzip", "lzf")


def storage_spec(spec: dict | None) -> dict:
    """experts.storage with the schema's defaults filled in, checked."""
    spec = fill("experts.storage", dict(spec or {}))
    dtype, compression, offsets = spec["dtype"], spec["compression"], spec["offsets"]
    if dtype not in DTYPES or compression not in COMPRESSION or not isinstance(offsets, bool):
        raise VlddError(f"experts.storage: dtype must be one of {sorted(DTYPES)}, compression "
                        f"one of {list(COMPRESSION)} and offsets true or false, got {dtype!r} / "
                        f"{compression!r} / {offsets!r}.")
    return {"dtype": dtype, "compression": compression, "offsets": offsets}


def encode(flat: torch.Tensor, dtype: str) -> np.ndarray:
    """A float32 row in the storage dtype (bfloat16: round to nearest, as its uint16 bits)."""
    if dtype == "bfloat16":
        return flat.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return flat.numpy().astype(DTYPES[dtype])


def decode(row: np.ndarray, dtype: str) -> torch.Tensor:
    if dtype == "bfloat16":
        return torch.from_numpy(row.astype(np.uint16).view(np.int16).copy()).view(
            torch.bfloat16).float()
    return torch.from_numpy(np.asarray(row, dtype=np.float32))


def create(f: h5py.File, layouts: dict, n_epochs: int, storage: dict | None = None):
    """Create the empty datasets in an open file; rows are filled by write_row."""
    storage = storage_spec(storage)
    f.attrs["params_dtype"] = storage["dtype"]
    f.attrs["params_compression"] = storage["compression"]
    f.attrs["params_offsets"] = storage["offsets"]
    extra = {}
    if storage["compression"] == "gzip":
        extra = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
    elif storage["compression"] == "lzf":
        extra = {"compression": "lzf", "shuffle": True}
    for group in GROUPS:
        layout = layouts[group]
        g = f.create_group(group, track_order=True)
        chunked = {"chunks": (1, min(layout.size, 1 << 18)), **extra} if layout.size else {}
        g.create_dataset("params", shape=(n_epochs + 1, layout.size),
                         dtype=DTYPES[storage["dtype"]], track_times=False, **chunked)
        if storage["offsets"]:
            g.create_dataset("base", shape=(layout.size,), dtype=DTYPES[storage["dtype"]],
                             track_times=False, **({**chunked, "chunks": chunked["chunks"][1:]}
                                                   if chunked else {}))
        h5_dataset(g, "names", np.array(layout.names, dtype=h5py.string_dtype()))
        h5_dataset(g, "shapes", np.array([json.dumps(list(s)) for s in layout.shapes],
                                         dtype=h5py.string_dtype()))
    m = f.create_group("metrics", track_order=True)
    m.create_dataset("loss", data=np.full(n_epochs, np.nan), track_times=False)
    m.create_dataset("val", data=np.full((n_epochs, 6), np.nan), track_times=False)


def write_row(f: h5py.File, epoch: int, flats: dict):
    """Write epoch `epoch` (row 0 first: with offsets it sets the base)."""
    dtype = str(f.attrs.get("params_dtype", "float32"))
    offsets = bool(f.attrs.get("params_offsets", False))
    for group in GROUPS:
        row = flats[group].float()
        if offsets:
            if epoch == 0:
                f[group]["base"][...] = encode(row, dtype)
            # The offset from the stored (rounded) base, so that differences between epochs,
            # which the matching loss is made of, keep the dtype's relative precision.
            row = row - decode(f[group]["base"][()], dtype)
        f[group]["params"][epoch] = encode(row, dtype)


class Trajectory:
    """Read access to one expert; rows are read on demand (one epoch = one chunk row)."""

    def __init__(self, path):
        self.path = path
        self.file = open_h5(path, "trajectory")
        try:
            self.n_epochs = int(self.file.attrs["n_epochs"])
            self.layouts = {}
            for group in GROUPS:
                g = self.file[group]
                names = [n.decode() if isinstance(n, bytes) else n for n in g["names"][()]]
                shapes = [tuple(json.loads(s)) for s in g["shapes"].asstr()[()]]
                self.layouts[group] = ParamLayout(names, shapes)
                if g["params"].shape != (self.n_epochs + 1, self.layouts[group].size):
                    raise KeyError(f"{group}/params has shape {g['params'].shape}")
        except (KeyError, ValueError, OSError) as exc:
            self.file.close()
            raise VlddError(f"{path}: incomplete or damaged trajectory ({exc}). Delete it and "
                            "rerun train_expert.") from exc
        self.attrs = dict(self.file.attrs)
        self.dtype = str(self.attrs.get("params_dtype", "float32"))
        self.offsets = bool(self.attrs.get("params_offsets", False))
        if self.offsets and any("base" not in self.file[g] for g in GROUPS):
            self.file.close()
            raise VlddError(f"{path}: incomplete or damaged trajectory (params_offsets without "
                            "base). Delete it and rerun train_expert.")

    def params(self, group: str, epoch: int) -> torch.Tensor:
        return self.rows(group, epoch)[0]

    def rows(self, group: str, *epochs: int) -> list:
        """The parameters of `group` at each of `epochs` (float32); with offsets the base is
        read once for all of them."""
        for epoch in epochs:
            if not 0 <= epoch <= self.n_epochs:
                raise VlddError(f"{self.path}: epoch {epoch} not recorded (0..{self.n_epochs}).")
        try:
            out = [decode(self.file[group]["params"][epoch], self.dtype) for epoch in epochs]
            if self.offsets:
                base = decode(self.file[group]["base"][()], self.dtype)
                out = [base + row for row in out]
            for epoch, row in zip(epochs, out):
                self._check_values(group, epoch, row)
            return out
        except OSError as exc:
            raise VlddError(f"{self.path}: cannot read epochs {list(epochs)} of {group} ({exc}). "
                            "The file is truncated: delete it and rerun train_expert.") from exc

    # No trained parameter comes near this; a flipped exponent bit (bf16/fp16) gives 1e30+.
    MAX_ABS = 1e6

    def _check_values(self, group, epoch, row):
        if row.numel() and not (torch.isfinite(row).all() and row.abs().max() <= self.MAX_ABS):
            raise VlddError(
                f"{self.path}: corrupt expert file: epoch {epoch} of the {group} parameters "
                f"holds NaN, inf or values above {self.MAX_ABS:g} (damaged bits; training "
                "itself never stores these). Delete the file and rerun train_expert.")

    def check_layout(self, group: str, layout: ParamLayout):
        mine = self.layouts[group]
        if mine.names != layout.names or mine.shapes != layout.shapes:
            raise VlddError(
                f"{self.path}: the {group} parameters of this expert ({len(mine.names)} tensors) "
                f"do not match the student model ({len(layout.names)} tensors). The expert was "
                "trained with another model; rerun train_expert with the current config.")

    def close(self):
        self.file.close()


def straighten(rows: torch.Tensor, layout: ParamLayout) -> torch.Tensor:
    """PTM-ST's shortcut of a trajectory segment: rows [K + 1, P] (epochs s..s+K of one group)
    -> each parameter tensor l moved onto the straight line from its first to its last row,
    theta_l(t) = (1 - beta_l(t)) theta_l(0) + beta_l(t) theta_l(K), at its own cumulative speed
    beta_l(t) = (path length of l up to t) / (its whole path length) (0 for a tensor that
    never moves). The end rows are kept bit for bit."""
    out = rows.clone()
    k = rows.shape[0] - 1
    if k < 2 or rows.shape[1] == 0:
        return out
    start = 0
    for n in layout.numels:
        seg = rows[:, start:start + n].double()
        steps = (seg[1:] - seg[:-1]).norm(dim=1)                 # [K]
        total = steps.sum()
        beta = steps.cumsum(0)[:-1] / total if total > 0 else torch.zeros(k - 1,
                                                                         dtype=seg.dtype)
        line = (1 - beta[:, None]) * seg[0] + beta[:, None] * seg[-1]
        out[1:k, start:start + n] = line.to(rows.dtype)
        start += n
    return out
