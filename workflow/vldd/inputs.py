"""Files a config names that the workflow reads as they are: the annotation files of a real
dataset and the evaluation tables of earlier runs (tables.include). Each is checked before
any job starts, with one error naming the key, the file and the fix."""
from __future__ import annotations

import glob
from pathlib import Path

from .errors import VlddError

WHERE = "README.md, 'Your own data, Flickr30K and COCO'"
ANNOTATION_KEYS = {"karpathy": ["annotations"], "blip": ["train", "val", "test"]}


def annotation_files(dataset: dict, prepared: bool) -> list[str]:
    """The annotation files of `dataset` (none for the synthetic source). Before the data are
    prepared a missing one is an error; once prepared, the raw files may go (then none is
    returned, so their absence reruns nothing)."""
    source = dataset["source"]
    files = []
    for key in ANNOTATION_KEYS.get(source, []):
        path = (dataset.get(source) or {}).get(key)
        if path is None and (source, key) == ("blip", "val"):
            continue  # optional
        name = f"dataset.{source}.{key}"
        if path is None:
            raise VlddError(f"{name} is not set: give the path of the annotation file "
                            f"({WHERE}).")
        files.append((name, path))
    missing = [(n, p) for n, p in files if not Path(p).is_file()]
    if missing and not prepared:
        name, path = missing[0]
        raise VlddError(f"{name}: {path} does not exist (relative to {Path.cwd()}). Download "
                        f"it ({WHERE}) or set {name} to where it is.")
    return [] if missing else [p for _, p in files]


def included_tables(patterns: list, own: list) -> list[str]:
    """The evaluation tables that tables.include's glob patterns match, besides this run's
    own (`own`); refuses a pattern matching nothing, a non-Parquet file or this run's
    results/tables (a cycle)."""
    own, out = set(own), []
    for pattern in patterns:
        found = sorted(glob.glob(pattern, recursive=True))
        if not found:
            raise VlddError(
                f"tables.include: '{pattern}' matches no file. Run the workflow with the "
                "config that produces those evaluations first, or fix the pattern (paths are "
                "relative to the directory snakemake runs in).")
        bad = [f for f in found if not f.endswith(".parquet")]
        if bad:
            raise VlddError(f"tables.include: '{pattern}' matches {bad[0]}, which is not an "
                            "evaluation Parquet file (results/<dataset>/eval/...).")
        tables = [f for f in found
                  if Path(f).resolve().parent == Path("results/tables").resolve()]
        if tables:
            raise VlddError(
                f"tables.include: '{pattern}' matches {tables[0]}, a table this workflow writes "
                "from the evaluations (a cycle that would delete it): narrow the pattern to "
                "other runs' eval folders, e.g. 'results/<dataset>/eval/<other model>/**/*.parquet'.")
        out += [f for f in found if f not in own and f not in out]
    return out
