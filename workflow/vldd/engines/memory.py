"""distill.engine auto: the exact engine's peak memory, predicted from its own graph.

The exact engine keeps every step's graph until the backward pass, so its memory grows
linearly with syn_steps. The graph is measured, not guessed: the forward part of the exact
engine (the trunk on the distilled pixels, K inner steps with create_graph, the matching
loss) runs for K = 1 and K = 2 under saved-tensor hooks that add up the bytes of every
storage autograd keeps for the backward pass. Their difference is one step's graph; the rest
is the fixed part (the trunk's graph on the pixels, the loss). The backward pass adds
transient gradient buffers: those of the trunk beside its graph, and about one step's worth
while a step is backpropagated. Calibrated on CPU against benchmarks/unroll.py's measured
peaks above the setup (Lite0 at 64 px, 50 pairs, mini_batch 50: trainable heads and last:1 at
K = 1, 2, 4, 8, trainable all at K = 2 and 8; every prediction within 6% of its measured
peak):

    peak(K) = FIXED_FACTOR * fixed + STEP_FACTOR * (K + 1) * per_step.

Auto picks exact when that fits in distill.memory_budget_gb (null: the device's free memory
now; CUDA: cudaMemGetInfo, CPU: MemAvailable) with a margin, else checkpointed (one step's
graph and a few parameter snapshots at a time).
"""
from __future__ import annotations

import logging
from dataclasses import replace

import torch

from ..losses import matching_loss
from .inner import Unroll, distilled_trunk_features, unroll

log = logging.getLogger(__name__)

FIXED_FACTOR, STEP_FACTOR = 1.25, 1.1
# exact is chosen when its predicted peak is at most this fraction of the budget (the rest:
# the allocator's fragmentation, the outer optimiser's state, what else the job holds)
MARGIN = 0.8


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves for the backward pass while fn() runs
    (fn's graph is dropped on return)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[(s.device.type, s.data_ptr())] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def exact_graph(u: Unroll, pixels, texts, lr_img, lr_txt) -> tuple[int, int]:
    """(fixed bytes, bytes per step) of the exact engine's graph on the inner problem `u`
    (its syn_steps are ignored: K = 1 and 2 are measured). The random state is left as it
    was (the probe's batches and dropout draw from their own streams)."""
    def forward(k):
        probe = replace(u, syn_steps=k, gen=torch.Generator().manual_seed(0), terms=None)
        feats = distilled_trunk_features(u.model, pixels, u.opts)
        end = unroll(probe, feats, texts, lr_img, lr_txt)
        matching_loss(end, probe.theta0, probe.target)

    with torch.random.fork_rng(devices=[pixels.device] if pixels.is_cuda else []):
        one, two = saved_bytes(lambda: forward(1)), saved_bytes(lambda: forward(2))
    per_step = max(0, two - one)
    return max(0, one - per_step), per_step


def exact_peak(fixed: int, per_step: int, syn_steps: int) -> int:
    """The exact engine's predicted peak (bytes above what the job held before it)."""
    return int(FIXED_FACTOR * fixed + STEP_FACTOR * (int(syn_steps) + 1) * per_step)


def free_bytes(device) -> int:
    """Memory free for the job now: CUDA's free device memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise OSError("no MemAvailable in /proc/meminfo: set distill.memory_budget_gb")


def choose_engine(predicted: int, budget: int) -> tuple[str, str]:
    """(engine, the sentence that says why) for auto."""
    fits = predicted <= MARGIN * budget
    engine = "exact" if fits else "checkpointed"
    return engine, (f"distill.engine auto: {engine} (the exact engine's graph needs about "
                    f"{predicted / 2**30:.2f} GB of a {budget / 2**30:.2f} GB budget; exact is "
                    f"chosen up to {MARGIN:.0%} of it)")


def pick_engine(u: Unroll, pixels, texts, lrs, budget_gb, device) -> str:
    """auto's engine for the inner problem `u` (one expert segment at the run's settings)
    on `device`, with budget_gb (None: the device's free memory now); logs which and why."""
    lr_img, lr_txt = (lr.detach().clone().requires_grad_(True) for lr in lrs)
    fixed, per_step = exact_graph(u, pixels, texts, lr_img, lr_txt)
    budget = free_bytes(device) if budget_gb is None else int(float(budget_gb) * 2**30)
    engine, why = choose_engine(exact_peak(fixed, per_step, u.syn_steps), budget)
    log.info("%s", why)
    return engine
