#!/usr/bin/env bash
# Time and peak memory of each stage against the dataset's size: the synthetic source at 1x,
# 4x and 16x a base size of training images (val and test fixed), each through the workflow
# (config/config.yaml + the sizes below): prepare_dataset, embed_captions, a random and a
# herding coreset, one expert of one epoch (herding embeds with it) and one evaluation (of
# the random coreset). Tables each stage's wall time and peak RSS (the rules' benchmark
# files) per size and the growth of its peak from 1x to 16x, into OUT.
#
#   benchmarks/scale.sh [WORKDIR]
#
# WORKDIR (default benchmarks/results/scale) is not committed. Environment:
#   BASE        training images at 1x (default 1000; 5 captions each)
#   RESOLUTION  pixels (default 64)
#   SCALES      default "1 4 16"
#   OUT         default benchmarks/scale.md
#   CORES       snakemake's cores, default 2
# Needs snakemake and vldd on PATH (make run builds .venv; then PATH=$PWD/.venv/bin:$PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-benchmarks/results/scale}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
BASE=${BASE:-1000}
RESOLUTION=${RESOLUTION:-64}
SCALES=${SCALES:-1 4 16}
OUT=${OUT:-benchmarks/scale.md}
CORES=${CORES:-2}
start=$(date +%s)
load_start=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
for f in $SCALES; do
    dir="$WORK/x$f"
    mkdir -p "$dir"
    cat > "$dir/scale.yaml" <<YAML
dataset:
  name: scale
  resolution: $RESOLUTION
  synthetic: {n_train: $((BASE * f)), n_val: 100, n_test: 200, captions_per_image: 5, seed: 0}
experts: {count: 1, epochs: 1}
coresets: {kinds: [random, herding]}
evaluate: {seeds: [0]}
YAML
    model=$(python -c "import yaml,sys; print(yaml.safe_load(open(sys.argv[1]))['model']['name'])" \
        "$ROOT/config/config.yaml")
    (cd "$dir" && snakemake "results/scale/eval/$model/coreset-random/n50/seed0.parquet" \
        "results/scale/coresets/$model/herding/n50/pairs.h5" --snakefile "$ROOT/Snakefile" \
        --cores "$CORES" --resources gpu="$CORES" --configfile "$ROOT/config/config.yaml" \
        "$dir/scale.yaml" > "$dir/snakemake.log" 2>&1) \
        || { echo "scale x$f failed: $dir/snakemake.log" >&2; exit 1; }
done
secs=$(( $(date +%s) - start ))
command="benchmarks/scale.sh"
for v in BASE RESOLUTION SCALES; do
    case "$v=${!v}" in BASE=1000|RESOLUTION=64|"SCALES=1 4 16") ;; *) command="$v=\"${!v}\" $command" ;; esac
done
LOADS="$load_start at the start, $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?") at the end, on $(nproc) cores" \
    python benchmarks/scale_report.py "$WORK" "$secs" "$(git rev-parse --short HEAD)" \
    "$command" "$BASE" "$RESOLUTION" $SCALES > "$OUT"
cat "$OUT"
