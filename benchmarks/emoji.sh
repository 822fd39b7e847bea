#!/usr/bin/env bash
# The emoji benchmark (config/emoji.yaml): budgets 50 / 100 / 200, the four coresets, the
# distillation and full data, 3 evaluation seeds, on CPU; writes the table to
# benchmarks/emoji.md with the time it took.
#
#   benchmarks/emoji.sh DATA_DIR [WORKDIR]
#
# DATA_DIR holds the set built by ../shared/datasets/emoji/prepare.py DATA_DIR (needs npm and
# Pillow; dataset_emoji.json + images/). WORKDIR (default benchmarks/results/emoji) gets the
# run's results/ (not committed). Needs snakemake and vldd on PATH (make run builds .venv; then
# PATH=$PWD/.venv/bin:$PATH). CORES (default 2) sets snakemake's cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$(realpath "${1:?usage: benchmarks/emoji.sh DATA_DIR [WORKDIR]}")
[ -f "$DATA/dataset_emoji.json" ] || { echo "$DATA/dataset_emoji.json not found: build it with ../shared/datasets/emoji/prepare.py $DATA" >&2; exit 2; }
WORK=${2:-benchmarks/results/emoji}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
CORES=${CORES:-2}
start=$(date +%s)
(cd "$WORK" && snakemake --snakefile "$ROOT/Snakefile" --cores "$CORES" --resources gpu="$CORES" \
    --configfile "$ROOT/config/config.yaml" "$ROOT/config/emoji.yaml" \
    --config "dataset={karpathy: {annotations: '$DATA/dataset_emoji.json', image_root: '$DATA'}}" \
    > "$WORK/run.log" 2>&1) || { echo "the run failed: $WORK/run.log" >&2; exit 1; }
secs=$(( $(date +%s) - start ))
{
    echo "# The emoji benchmark"
    echo
    echo "Regenerate: \`benchmarks/emoji.sh DATA_DIR\` (DATA_DIR built by"
    echo "\`../shared/datasets/emoji/prepare.py DATA_DIR\`), i.e. \`snakemake --cores $CORES"
    echo "--configfile config/config.yaml config/emoji.yaml\` with the data path set."
    echo "Run $(date -u +%Y-%m-%d) on $(nproc) CPU cores ($(python -c 'import platform; print(platform.processor() or platform.machine())')), no GPU,"
    echo "git $(git rev-parse --short HEAD): $((secs / 60)) min $((secs % 60)) s wall for the whole workflow"
    echo "(prepare, embed, 3 experts, 3 distillations, 12 coresets, 45 evaluations of pair sets and"
    echo "3 full-data runs)."
    echo
    sed '1,/^$/d' "$WORK/results/tables/retrieval.md"
} > benchmarks/emoji.md
cat benchmarks/emoji.md
