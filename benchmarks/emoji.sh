#!/usr/bin/env bash
# The emoji benchmark (config/emoji.yaml on the default): the four coresets, full data, and the
# distillation with 3 distillation seeds (distill.seed 0 and the variants s1, s2) plus the
# image-only variant (learn_texts: false), 3 evaluation seeds each, on CPU. Writes a summary
# (per budget: distilled mean +- std over the seeds, its worst seed, the best coreset, full
# data, the image-only set against random) and the full retrieval tables to OUT.
#
#   benchmarks/emoji.sh DATA_DIR [WORKDIR]
#
# DATA_DIR holds the set built by ../shared/datasets/emoji/prepare.py DATA_DIR (needs npm and
# Pillow; dataset_emoji.json + images/). WORKDIR (default benchmarks/results/emoji) gets one
# run folder per numeric path (not committed). Environment:
#   NUMERICS  "native" and/or "default" (ATEN_CPU_CAPABILITY=default: PyTorch's unvectorised
#             kernels, another rounding); default "native default"
#   BUDGETS   e.g. "100" to run only that budget; default the config's (50 100 200)
#   OUT       default benchmarks/emoji.md
#   CORES     snakemake's cores, default 2
# Needs snakemake and vldd on PATH (make run builds .venv; then PATH=$PWD/.venv/bin:$PATH).
# About an hour per numeric path and all budgets on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$(realpath "${1:?usage: benchmarks/emoji.sh DATA_DIR [WORKDIR]}")
[ -f "$DATA/dataset_emoji.json" ] || { echo "$DATA/dataset_emoji.json not found: build it with ../shared/datasets/emoji/prepare.py $DATA" >&2; exit 2; }
WORK=${2:-benchmarks/results/emoji}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
CORES=${CORES:-2}
NUMERICS=${NUMERICS:-native default}
OUT=${OUT:-benchmarks/emoji.md}
budgets=""
[ -n "${BUDGETS:-}" ] && budgets="  budgets: [$(echo $BUDGETS | tr ' ' ',')]"
cat > "$WORK/bench.yaml" <<YAML
dataset:
  karpathy: {annotations: '$DATA/dataset_emoji.json', image_root: '$DATA'}
distill:
$budgets
  variants:
    s1: {seed: 1}
    s2: {seed: 2}
    imageonly: {learn_texts: false}
YAML
start=$(date +%s)
load_start=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
for path in $NUMERICS; do
    mkdir -p "$WORK/$path"
    env=()
    [ "$path" = default ] && env=(ATEN_CPU_CAPABILITY=default)
    (cd "$WORK/$path" && env "${env[@]}" snakemake --snakefile "$ROOT/Snakefile" --cores "$CORES" \
        --resources gpu="$CORES" --configfile "$ROOT/config/config.yaml" "$ROOT/config/emoji.yaml" \
        "$WORK/bench.yaml" --quiet rules > "$WORK/$path.log" 2>&1) \
        || { echo "run $path failed: $WORK/$path.log" >&2; exit 1; }
done
secs=$(( $(date +%s) - start ))
command="benchmarks/emoji.sh DATA_DIR"
[ "$NUMERICS" != "native default" ] && command="NUMERICS=\"$NUMERICS\" $command"
[ -n "${BUDGETS:-}" ] && command="BUDGETS=\"$BUDGETS\" $command"
LOADS="$load_start at the start, $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?") at the end, on $(nproc) cores" \
    python benchmarks/emoji_report.py "$WORK" "$secs" "$(git rev-parse --short HEAD)" "$command" \
    $NUMERICS > "$OUT"
cat "$OUT"
