#!/usr/bin/env bash
# The distillation methods side by side on emoji at 100 pairs: each method of METHODS
# (distill.method) with 3 distillation seeds (distill.seed 0 and the variants s1, s2), 3
# evaluation seeds each, against the four coresets and full data, on each numeric path of
# NUMERICS. config/config.yaml + config/emoji.yaml, budgets [100]; the methods share the
# experts, coresets and full-data runs of their path (one workdir per path, one snakemake run
# per method). All on one model: TRAINABLE heads (default; RepBlend's symmetric projection
# matching: Lite0 frozen, image and text projection heads trained, model lite0-minilm-heads)
# or the default config's last:1 (model lite0-minilm). Writes the table to OUT.
#
#   benchmarks/methods.sh DATA_DIR [WORKDIR]
#
# DATA_DIR: the emoji set built by ../shared/datasets/emoji/prepare.py DATA_DIR. WORKDIR
# (default benchmarks/results/methods) is not committed. Environment:
#   METHODS   default "mtt lors repblend ptmst covmatch"
#   TRAINABLE heads (default) or last:1
#   NUMERICS  "native" and/or "default" (ATEN_CPU_CAPABILITY=default); default "native default"
#   OUT       default benchmarks/methods.md
#   CORES     snakemake's cores, default 2
#   ITERATIONS distill.iterations of every method but covmatch (default: config.yaml's, 150)
# Needs snakemake and vldd on PATH (make run builds .venv; then PATH=$PWD/.venv/bin:$PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DATA=$(realpath "${1:?usage: benchmarks/methods.sh DATA_DIR [WORKDIR]}")
[ -f "$DATA/dataset_emoji.json" ] || { echo "$DATA/dataset_emoji.json not found: build it with ../shared/datasets/emoji/prepare.py $DATA" >&2; exit 2; }
WORK=${2:-benchmarks/results/methods}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
CORES=${CORES:-2}
METHODS=${METHODS:-mtt lors repblend ptmst covmatch}
TRAINABLE=${TRAINABLE:-heads}
case "$TRAINABLE" in
    heads) MODEL=lite0-minilm-heads; FEATURES=encoder ;;
    last:1) MODEL=lite0-minilm; FEATURES=joint ;;
    *) echo "TRAINABLE must be heads or last:1" >&2; exit 2 ;;
esac
NUMERICS=${NUMERICS:-native default}
OUT=${OUT:-benchmarks/methods.md}
start=$(date +%s)
load_start=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
for method in $METHODS; do
    # covmatch: its own iteration count and batch (an iteration is one forward and backward of
    # the distilled pairs, no unroll: benchmarks/methods.md), the last state (its loss is
    # measured on a new real batch every iteration, so the best window is noise), and the
    # statistics of what the trained heads read (features encoder; joint with last:1)
    extra=""
    [ -n "${ITERATIONS:-}" ] && [ "$method" != covmatch ] && extra="  iterations: $ITERATIONS"
    [ "$method" = covmatch ] && extra="  iterations: 300
  select: last
  covmatch: {features: $FEATURES, real_batch: 1024}"
    # ptmst: PTM-ST's 100-pair script (one phase): LoRS with a full S, the shortcut
    # trajectories of the experts' epochs 0-12 (the segments of config/emoji.yaml, starts
    # below 8 with 4-epoch targets, end by epoch 11) and an EMA (0.99) of the distilled tensors
    [ "$method" = ptmst ] && extra="$extra
  shortcut: [0, 12]
  ema: 0.99
  lors: {similarity: full}"
    cat > "$WORK/$method.yaml" <<YAML
dataset:
  karpathy: {annotations: '$DATA/dataset_emoji.json', image_root: '$DATA'}
model:
  name: $MODEL
  image_encoder: {trainable: '$TRAINABLE'}
distill:
  method: $method
  budgets: [100]
  variants:
    s1: {seed: 1}
    s2: {seed: 2}
$extra
YAML
done
for path in $NUMERICS; do
    mkdir -p "$WORK/$path"
    env=()
    [ "$path" = default ] && env=(ATEN_CPU_CAPABILITY=default)
    for method in $METHODS; do
        (cd "$WORK/$path" && env "${env[@]}" snakemake --snakefile "$ROOT/Snakefile" \
            --cores "$CORES" --resources gpu="$CORES" --configfile "$ROOT/config/config.yaml" \
            "$ROOT/config/emoji.yaml" "$WORK/$method.yaml" --quiet rules \
            > "$WORK/$path-$method.log" 2>&1) \
            || { echo "run $path $method failed: $WORK/$path-$method.log" >&2; exit 1; }
    done
done
secs=$(( $(date +%s) - start ))
command="benchmarks/methods.sh DATA_DIR"
[ "$NUMERICS" != "native default" ] && command="NUMERICS=\"$NUMERICS\" $command"
[ "$METHODS" != "mtt lors repblend ptmst covmatch" ] && command="METHODS=\"$METHODS\" $command"
[ "$TRAINABLE" != heads ] && command="TRAINABLE=$TRAINABLE $command"
[ -n "${ITERATIONS:-}" ] && command="ITERATIONS=$ITERATIONS $command"
[ "$OUT" != benchmarks/methods.md ] && command="OUT=$OUT $command"
LOADS="$load_start at the start, $(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?") at the end, on $(nproc) cores" \
    python benchmarks/methods_report.py "$WORK" "$secs" "$(git rev-parse --short HEAD)" \
    "$command" "$METHODS" "$MODEL" $NUMERICS > "$OUT"
cat "$OUT"
