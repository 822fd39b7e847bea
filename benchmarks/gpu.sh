#!/usr/bin/env bash
# The unroll benchmark on one CUDA GPU at 224 px: prints the tables (and writes
# benchmarks/results/unroll-cuda-224px-*.json). Run from anywhere, in the project's
# environment (python with vldd's dependencies; PYTHON=... to choose another interpreter);
# extra arguments go to benchmarks/unroll.py, e.g. `benchmarks/gpu.sh --engines exact,checkpointed`.
#
# 1. fp32 (strict: TF32 off, also for cuDNN convolutions): the gradient check (reference,
#    exact and checkpointed agree within 1e-4), the main table at syn_steps 8 and the
#    syn_steps sweep 2..32 (peak = torch.cuda.max_memory_allocated above the state after
#    setup). At 224 px the reference keeps 50 full-resolution encoder graphs per step; its
#    largest sweep points may run out of memory and are then listed as errors.
# 2. bf16 autocast of the trunk + TF32: the same engines, timed, and how far their gradient
#    is from fp32 (printed as the exact+bf16+tf32 row of the check).
# 3. The paper's setting: NFNet-L0 with every layer trained, 224 px, 100 pairs, syn_steps 8,
#    mini_batch 100 (random init: the machine needs no hub access; timing does not depend on
#    the weights), fp32 timing of reference, exact and checkpointed, the check in float64.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" - <<'PY'
import torch
assert torch.cuda.is_available(), "benchmarks/gpu.sh needs a CUDA GPU (torch.cuda.is_available() is False)"
p = torch.cuda.get_device_properties(0)
print(f"GPU: {p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}")
PY
"$PY" benchmarks/unroll.py --device cuda --resolution 224 --iterations 5 --warmup 2 \
    --reference-max-steps 32 "$@"
"$PY" benchmarks/unroll.py --device cuda --resolution 224 --iterations 5 --warmup 2 \
    --autocast bf16 --tf32 --sweep none --engines exact,checkpointed,constant-memory,heads-only "$@"
"$PY" benchmarks/unroll.py --device cuda --image-encoder nfnet_l0 --image-weights none \
    --trainable all --resolution 224 --budget 100 --mini-batch 100 --syn-steps 8 \
    --iterations 3 --warmup 1 --sweep none --check-dtype float64 --search-lrs none \
    --search-steps none --engines reference,exact,checkpointed "$@"
