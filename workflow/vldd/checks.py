"""Checks of what a stage is given before it starts: the settings (--config-json) and the
output folders, and the evaluation tables that `summarize` merges. No torch here: the
report environment imports this module too.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from . import config
from .errors import VlddError

FIX = "config/README.md describes every key."


def _nonfinite(obj, where):
    """The first key path holding NaN or +-inf, or None."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return where
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) \
        if isinstance(obj, list) else ()
    for key, value in items:
        found = _nonfinite(value, f"{where}.{key}" if where else str(key))
        if found:
            return found
    return None


def check_finite(cfg: dict) -> None:
    where = _nonfinite(cfg, "")
    if where:
        raise VlddError(f"config {where} is not a finite number (NaN or inf): set a real "
                        f"value. {FIX}")


def _message(err, where: str) -> str:
    if err.validator == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        bad = sorted(set(err.instance) - set(known))
        return (f"config {where}: unknown key(s) {', '.join(bad)} (misspelt?); the keys "
                f"allowed there are {', '.join(known)}. {FIX}")
    if err.validator == "enum":
        return (f"config {where} = {err.instance!r}: not allowed; use one of "
                f"{', '.join(map(str, err.validator_value))}. {FIX}")
    if err.validator == "pattern":
        return (f"config {where} = {err.instance!r}: does not match "
                f"{err.validator_value} ({err.schema.get('description', '')}). {FIX}")
    if err.validator == "uniqueItems":
        return (f"config {where} = {err.instance!r} repeats a value: each value is one run "
                f"(a repeat would be counted twice in the tables); list each once. {FIX}")
    return f"config {where} = {err.instance!r}: {err.message}. {FIX}"


def validate_sections(cfg: dict) -> None:
    """Each section of --config-json against its part of the config schema (when the
    jsonschema package is there; Snakemake has checked the whole config anyway)."""
    check_finite(cfg)
    try:
        import jsonschema
    except ImportError:
        return
    schema = config.schema()
    model = cfg.get("model")
    if isinstance(model, dict) and "@" in str(model.get("name", "")):
        cfg = {**cfg, "model": {**model, "name": model["name"].split("@")[0]}}  # cross-arch.
    cls = jsonschema.validators.validator_for(schema)
    errors = sorted(cls(schema).iter_errors(cfg), key=lambda e: list(map(str, e.path)))
    if errors:
        err = errors[0]
        raise VlddError(_message(err, ".".join(map(str, err.absolute_path)) or "--config-json"))


def _can_create(folder: Path) -> bool:
    """os.access says yes to root everywhere except on read-only mounts; a probe file is sure."""
    import tempfile
    try:
        with tempfile.TemporaryFile(dir=folder, prefix=".vldd-probe-"):
            return True
    except OSError:
        return False


def check_writable(path: Path, what: str) -> None:
    """Refuse an output whose folder cannot be created or written, before any work."""
    folder = Path(path).parent if what != "--out-dir" else Path(path)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK) \
            or not _can_create(existing):
        raise VlddError(f"{what} {path}: the folder {existing} is not writable (or not a "
                        "folder). Fix its permissions or choose another output path.")
    if Path(path).is_dir() and what != "--out-dir":
        raise VlddError(f"{what} {path} is a folder: give a file path.")


# ------------------------------------------------------------------ tables.include

EVAL_COLUMNS = {"dataset", "method", "budget", "seed", "metric", "value"}


def check_eval_table(path) -> None:
    """Refuse a Parquet file that is not an evaluation table (evaluate / train_full)."""
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as exc:  # noqa: BLE001  (pyarrow raises several types)
        raise VlddError(f"{path}: not a readable Parquet file ({exc}). Delete it and rerun "
                        "evaluate, or drop it from tables.include.") from exc
    import json

    missing = sorted(EVAL_COLUMNS - set(schema.names))
    meta = json.loads((schema.metadata or {}).get(b"vldd", b"{}"))
    if missing or meta.get("schema") != "vldd/eval":
        what = f"no column(s) {', '.join(missing)}" if missing else \
            f"it holds {meta.get('schema') or 'no vldd schema'}"
        raise VlddError(f"{path}: not an evaluation table ({what}); tables.include takes the "
                        "eval/**/seed*.parquet files of other runs only: narrow the pattern.")
