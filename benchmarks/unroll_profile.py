"""Where one distillation iteration's time and memory go: a profile of one engine.

    python benchmarks/unroll_profile.py --trainable all            # exact, the whole encoder
    python benchmarks/unroll_profile.py --engine reference --top 15

Same problem and options as benchmarks/unroll.py (its --resolution, --budget, --syn-steps,
--trainable, ...). After one warm-up iteration it prints, for the timed iterations that
follow, each iteration's wall, user and system time and its page faults (ru_minflt); then,
from one more iteration, the aten operators that took the most time (wall time per operator
call, measured around each call by a TorchDispatchMode: the backward's operators included;
the autograd engine's own bookkeeping is not), and the bytes autograd saves for the backward
during one step of the unroll (saved-tensor hooks, each storage counted once), with the
shapes that hold the most. Run it in the environment the pipeline's jobs get (`vldd.heap`'s
variables, which the harness sets for its children) or without, to see the page faults.
"""
from __future__ import annotations

import argparse
import collections
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow"))

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import unroll  # noqa: E402
from unroll_problem import Setup, make_problem  # noqa: E402


class _OpTimer(TorchDispatchMode):
    """Wall time and calls per aten operator."""

    def __init__(self):
        super().__init__()
        self.stats = collections.defaultdict(lambda: [0, 0.0])

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        t0 = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        s = self.stats[func.__name__]
        s[0] += 1
        s[1] += time.perf_counter() - t0
        return out


def saved_bytes(setup, engine):
    """(total bytes, {(shape, dtype): bytes}) that autograd saves during a 1-step iteration."""
    seen, by = set(), collections.Counter()

    def pack(t):
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            by[(tuple(t.shape), str(t.dtype).replace("torch.", ""))] += st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        setup.run(engine, 0, 1)
    return sum(by.values()), by


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", default="exact")
    p.add_argument("--timed", type=int, default=3, help="timed iterations (3)")
    p.add_argument("--top", type=int, default=12, help="operators and shapes listed (12)")
    ours, rest = p.parse_known_args(argv)
    args = unroll.parse(rest)
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        problem = Path(tmp) / "problem.pt"
        make_problem(args, problem)
        s = Setup(args, problem)
        print(f"{ours.engine}: trainable {args.trainable}, {args.resolution} px, {args.budget} "
              f"pairs, syn_steps {args.syn_steps}, mini_batch {args.mini_batch}; "
              f"{torch.get_num_threads()} threads")
        s.run(ours.engine, 0, args.syn_steps)
        print("| iteration | wall s | user s | system s | page faults |\n|---|---|---|---|---|")
        for it in range(1, ours.timed + 1):
            r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            s.run(ours.engine, it, args.syn_steps)
            dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            print(f"| {it} | {dt:.2f} | {r1.ru_utime - r0.ru_utime:.2f} | "
                  f"{r1.ru_stime - r0.ru_stime:.2f} | {r1.ru_minflt - r0.ru_minflt} |")
        timer = _OpTimer()
        with timer:
            s.run(ours.engine, ours.timed + 1, args.syn_steps)
        total = sum(v[1] for v in timer.stats.values())
        print(f"\nOperators of one iteration ({total:.2f} s inside operators)\n"
              "| operator | calls | s | share |\n|---|---|---|---|")
        for name, (n, sec) in sorted(timer.stats.items(), key=lambda kv: -kv[1][1])[:ours.top]:
            print(f"| {name} | {n} | {sec:.3f} | {sec / total:.0%} |")
        total, by = saved_bytes(s, ours.engine)
        print(f"\nSaved for the backward in a 1-step iteration: {total / 2**20:.0f} MB\n"
              "| shape | dtype | MB |\n|---|---|---|")
        for (shape, dtype), nb in by.most_common(ours.top):
            print(f"| {list(shape)} | {dtype} | {nb / 2**20:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
