"""Are two runs' artifacts the same? For refactors that must not change any output.

    python benchmarks/compare_runs.py BEFORE/results AFTER/results

Walks both results/ trees and compares every artifact present in either:

- HDF5 (.h5): the same groups and datasets, each dataset's dtype, shape and bytes, and every
  attribute of every object;
- Parquet: the same columns, types and values, and the same `vldd` provenance metadata;
- anything else (tables .md, figures .png, .json): the same bytes.

The only thing ignored is provenance that names the commit (`git_commit`), so a run of one
commit and a run of its refactor compare equal exactly when they computed the same. Logs
(results/logs) and the rules' timing files (results/benchmarks) are not artifacts and are
skipped. Prints one line per difference and a summary; exit status 1 when anything differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import h5py
import numpy as np
import pyarrow.parquet as pq

IGNORED_KEYS = {"git_commit"}
SKIPPED_DIRS = {"logs", "benchmarks"}


def artifacts(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")
            if p.is_file() and p.relative_to(root).parts[0] not in SKIPPED_DIRS}


def _attrs(obj) -> dict:
    out = {}
    for key, value in obj.attrs.items():
        if key in IGNORED_KEYS:
            continue
        out[key] = value.tolist() if isinstance(value, np.ndarray) else value
    return out


def _h5_objects(path: Path) -> dict:
    objects = {}
    with h5py.File(path, "r") as h5:
        objects["/"] = ("group", _attrs(h5), None)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                if isinstance(data, np.ndarray) and data.dtype.kind != "O":
                    raw = data.tobytes()
                else:    # variable-length strings: an object array holds pointers
                    raw = repr(data.tolist() if isinstance(data, np.ndarray) else data).encode()
                objects[name] = (f"dataset {obj.dtype} {obj.shape}", _attrs(obj), raw)
            else:
                objects[name] = ("group", _attrs(obj), None)
        h5.visititems(visit)
    return objects


def compare_h5(a: Path, b: Path) -> list[str]:
    left, right = _h5_objects(a), _h5_objects(b)
    diffs = [f"only in one file: {name}" for name in sorted(set(left) ^ set(right))]
    for name in sorted(set(left) & set(right)):
        (kind_a, attrs_a, raw_a), (kind_b, attrs_b, raw_b) = left[name], right[name]
        if kind_a != kind_b:
            diffs.append(f"{name}: {kind_a} vs {kind_b}")
        elif raw_a != raw_b:
            diffs.append(f"{name}: values differ")
        for key in sorted(set(attrs_a) | set(attrs_b)):
            if repr(attrs_a.get(key)) != repr(attrs_b.get(key)):
                diffs.append(f"{name}: attribute {key} differs")
    return diffs


def _provenance(table) -> dict:
    meta = (table.schema.metadata or {}).get(b"vldd")
    prov = json.loads(meta) if meta else {}
    return {k: v for k, v in prov.items() if k not in IGNORED_KEYS}


def compare_parquet(a: Path, b: Path) -> list[str]:
    left, right = pq.read_table(a), pq.read_table(b)
    diffs = []
    if left.schema.remove_metadata() != right.schema.remove_metadata():
        diffs.append("columns or types differ")
    elif not left.equals(right):
        diffs.append("values differ")
    prov_a, prov_b = _provenance(left), _provenance(right)
    for key in sorted(set(prov_a) | set(prov_b)):
        if prov_a.get(key) != prov_b.get(key):
            diffs.append(f"provenance {key} differs")
    return diffs


def compare(before: Path, after: Path) -> list[str]:
    names_a, names_b = artifacts(before), artifacts(after)
    lines = [f"{name}: only in {before if name in names_a else after}"
             for name in sorted(names_a ^ names_b)]
    for name in sorted(names_a & names_b):
        a, b = before / name, after / name
        if name.endswith(".h5"):
            diffs = compare_h5(a, b)
        elif name.endswith(".parquet"):
            diffs = compare_parquet(a, b)
        else:
            diffs = [] if a.read_bytes() == b.read_bytes() else ["bytes differ"]
        lines += [f"{name}: {d}" for d in diffs]
    return lines


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    before, after = Path(argv[0]), Path(argv[1])
    for root in (before, after):
        if not root.is_dir():
            print(f"error: {root} is not a directory; give two results/ folders", file=sys.stderr)
            return 2
    lines = compare(before, after)
    for line in lines:
        print(line)
    n = len(artifacts(before) | artifacts(after))
    print(f"{n} artifacts compared, {len(lines)} differences"
          + ("" if lines else ": identical (git_commit ignored)"))
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
