"""inspect: what a vldd artifact is, where it came from, and the shapes inside it."""
from __future__ import annotations

import json
from pathlib import Path

import h5py

from ..errors import VlddError
from ..io import read_parquet_meta


def _fmt(value) -> str:
    if isinstance(value, bytes):
        value = value.decode()
    if hasattr(value, "tolist"):
        value = value.tolist()
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 200 else text[:197] + "..."


def describe(path) -> str:
    path = Path(path)
    if not path.exists():
        raise VlddError(f"{path}: file not found.")
    lines = [f"{path}"]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # noqa: BLE001
            raise VlddError(f"{path}: not a readable Parquet file ({exc}).") from exc
        meta = read_parquet_meta(path)
        lines.append(f"  parquet: {pf.metadata.num_rows} rows")
        lines += [f"  column {f.name}: {f.type}" for f in pf.schema_arrow]
        lines += [f"  {k} = {_fmt(v)}" for k, v in sorted(meta.items())]
        if not meta:
            lines.append("  (no vldd provenance)")
        return "\n".join(lines)
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VlddError(f"{path}: not a readable HDF5 or Parquet file ({exc}); it may be "
                        "truncated.") from exc
    with f:
        lines += [f"  {k} = {_fmt(v)}" for k, v in f.attrs.items()]

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                lines.append(f"  /{name}: {obj.dtype} {list(obj.shape)}")

        f.visititems(visit)
    return "\n".join(lines)
