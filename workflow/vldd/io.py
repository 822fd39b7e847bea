"""Atomic outputs, provenance and small HDF5/Parquet helpers shared by every stage.

Every artifact is written under a temporary name in its final directory and renamed
into place only when complete, so a killed job never leaves a file that looks finished.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from . import __version__
from .errors import VlddError

SCHEMA_VERSION = 1


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def config_hash(section) -> str:
    return hashlib.sha256(canonical_json(section).encode()).hexdigest()


def git_commit() -> str:
    """The commit of the vldd checkout this code runs from, or '' when unknown."""
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def provenance(kind: str, config_section, **extra) -> dict:
    """Attributes every artifact carries: what it is, which code and config made it."""
    prov = {
        "schema": f"vldd/{kind}",
        "schema_version": SCHEMA_VERSION,
        "vldd_version": __version__,
        "git_commit": git_commit(),
        "config_sha256": config_hash(config_section),
        "config_json": canonical_json(config_section),
    }
    for key, value in sorted(extra.items()):
        prov[key] = value if isinstance(value, (int, float, str)) else canonical_json(value)
    return prov


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True     # exists, owned by someone else
    return True


def remove_stale_temporaries(path: Path) -> None:
    """Temporary files of `path` left by killed writers (SIGKILL, a crash) of this host."""
    for old in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        pid = old.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            old.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it to `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def h5_writer(path, attrs: dict):
    """Open a new HDF5 file for atomic writing, with root attributes set."""
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", track_order=True) as f:
            for key, value in attrs.items():
                f.attrs[key] = value
            yield f


def h5_dataset(group, name, data, compress=False, chunks=None):
    """A dataset without timestamps (so equal inputs give equal bytes)."""
    kwargs = {"track_times": False}
    if compress:
        kwargs.update(compression="gzip", compression_opts=4, shuffle=True)
        kwargs["chunks"] = chunks if chunks is not None else True
    elif chunks is not None:
        kwargs["chunks"] = chunks
    return group.create_dataset(name, data=data, **kwargs)


def open_h5(path, expected_schema: str | None = None) -> h5py.File:
    """Open a vldd HDF5 file for reading, with one clear error if it is missing or damaged."""
    path = Path(path)
    if not path.exists():
        raise VlddError(f"{path}: file not found. Run the stage that produces it first "
                        "(snakemake makes it for you).")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise VlddError(f"{path}: not a readable HDF5 file ({exc}). It is probably truncated "
                        "or corrupt: delete it and rerun the stage that produced it.") from exc
    if expected_schema is not None:
        schema = f.attrs.get("schema", "")
        if schema != f"vldd/{expected_schema}":
            f.close()
            raise VlddError(f"{path}: holds {schema or 'no vldd schema'!s}, expected "
                            f"vldd/{expected_schema}. Point the stage at the right file.")
    return f


def write_parquet(df: pd.DataFrame, path, meta: dict | None = None) -> None:
    """Write a table atomically; provenance goes into the file's key-value metadata."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    if meta:
        merged = dict(table.schema.metadata or {})
        merged[b"vldd"] = canonical_json(meta).encode()
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_meta(path) -> dict:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    raw = meta.get(b"vldd")
    return json.loads(raw) if raw else {}


def sha256_file(path, chunk=1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def as_str_array(values):
    return np.array([str(v) for v in values], dtype=h5py.string_dtype())
