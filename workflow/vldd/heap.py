"""The C heap of the pipeline's processes: keep freed memory for the next allocation.

One distillation iteration allocates and frees the same few gigabytes of activations and
gradients, every iteration (an expert or evaluation epoch, less). With glibc's defaults, blocks
above the adaptive mmap threshold (128 KiB to 32 MiB) come from the kernel and go back to it
when freed, and a freed heap top is trimmed; every iteration then faults its memory in again,
page by page, zero-filled by the kernel (benchmarks/unroll_profile.py prints the page faults
and system time per iteration; benchmarks/README.md has them with and without HEAP_ENV).

HEAP_ENV asks for an mmap threshold of 1 GiB, no trimming and heap growth 256 MiB at a time,
so freed blocks stay in the process for the next iteration. The resident set then stays at the
peak between iterations (each iteration reaches it again); the peak does not change. glibc
reads these variables when a process starts, so they are set for the child processes: the Snakefile puts them into the
environment of every job (unless already set), and benchmarks/harness.py into every
measured process. Other C libraries ignore them.
"""
from __future__ import annotations

import os

HEAP_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(2**30),    # blocks up to 1 GiB from the heap
    "MALLOC_TRIM_THRESHOLD_": str(2**62),    # never give a freed heap top back
    "MALLOC_TOP_PAD_": str(256 * 2**20),     # grow the heap 256 MiB at a time
}


def set_heap_env(env=None):
    """Add HEAP_ENV's variables to the mapping `env` (default os.environ) where unset; returns
    `env`."""
    env = os.environ if env is None else env
    for key, value in HEAP_ENV.items():
        env.setdefault(key, value)
    return env
