#!/usr/bin/env bash
# The effect of the trajectory storage on the distilled sets: the same workflow run twice,
# once with the rows stored exactly (float32, no compression, no offsets) and once with the
# storage of the config (by default the schema's default, bfloat16 offsets + gzip), then the
# distilled rows of both tables side by side. The experts train identically (float32) in both
# runs; only what the distillation reads back differs.
#
#   benchmarks/storage_quality.sh [WORKDIR] [extra config files ...]
#
# WORKDIR (default benchmarks/results/storage-quality) gets two run folders, exact/ and
# default/. Extra config files are layered on config/config.yaml in both runs (e.g.
# config/emoji.yaml). Needs snakemake and vldd on PATH (make run builds .venv; then
# PATH=$PWD/.venv/bin:$PATH). About 2 x 8 CPU minutes on the default config.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-benchmarks/results/storage-quality}
shift || true
EXTRA=()
for f in "$@"; do EXTRA+=("$(realpath "$f")"); done
mkdir -p "$WORK/exact" "$WORK/default"
WORK=$(realpath "$WORK")
# only the distillation is compared: no coresets, no full-data runs
cat > "$WORK/exact.yaml" <<'YAML'
experts:
  storage: {dtype: float32, compression: none, offsets: false}
coresets: {kinds: []}
full: {enabled: false}
YAML
cat > "$WORK/default.yaml" <<'YAML'
coresets: {kinds: []}
full: {enabled: false}
YAML
for run in exact default; do
    (cd "$WORK/$run" && snakemake --snakefile "$ROOT/Snakefile" --cores "${CORES:-2}" \
        --resources gpu="${CORES:-2}" --configfile "$ROOT/config/config.yaml" "${EXTRA[@]}" \
        "$WORK/$run.yaml" --quiet rules > "$WORK/$run.log" 2>&1) || { echo "run $run failed: $WORK/$run.log"; exit 1; }
done
python - "$WORK" <<'PY'
import sys
from pathlib import Path
import h5py
import pandas as pd
work = Path(sys.argv[1])
rows = []
for run in ("exact", "default"):
    t = pd.read_parquet(work / run / "results/tables/retrieval.parquet")
    t = t[t["method"].str.startswith("distilled")]
    experts = sorted((work / run / "results").glob("*/experts/*/expert_*.h5"))
    with h5py.File(experts[0]) as f:
        storage = f"{f.attrs['params_dtype']}, {f.attrs['params_compression']}, offsets {bool(f.attrs.get('params_offsets', False))}"
    size = sum(p.stat().st_size for p in experts) / len(experts) / 2**20
    g = t.groupby(["budget", "metric"])["value"].agg(["mean", "std"])
    for (budget, metric), r in g.iterrows():
        rows.append({"run": run, "storage": storage, "MiB/expert": round(size, 1),
                     "budget": budget, "metric": metric, "mean": r["mean"], "std": r["std"]})
df = pd.DataFrame(rows)
wide = df.pivot_table(index=["budget", "metric"], columns="run", values="mean")
wide["default - exact"] = wide["default"] - wide["exact"]
print(df.drop_duplicates("run")[["run", "storage", "MiB/expert"]].to_string(index=False))
print()
print(wide.round(2).to_string())
r1 = wide.loc[(slice(None), ["TR@1", "IR@1"]), "default - exact"]
print(f"\nlargest loss of R@1 (TR@1, IR@1): {max(0.0, -r1.min()):.2f} points (target: at most 1)")
PY
