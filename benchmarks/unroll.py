"""Speed and memory of the distillation engines, per distillation iteration.

    python benchmarks/unroll.py                      # the default setting and the syn_steps sweep
    python benchmarks/unroll.py --quick              # a smoke run (seconds)
    python benchmarks/unroll.py --device cuda --resolution 224    # see benchmarks/gpu.sh
    python benchmarks/unroll.py --trainable all --check-only      # the check + sensitivity

Engines (vldd.engines, selectable as distill.engine, plus the baseline of reference.py):

- reference        the seed code's way: the student rebuilt every iteration (pretrained weights
                   reloaded), its parameters replaced by views of one flat vector rebound
                   before every step (ReparamModule), the whole image encoder run on the
                   pixels at every inner step, the graph of all steps kept.
- exact            vldd's default: functional_call on flat vectors, frozen trunk once per
                   iteration, create_graph through all steps (the tail evaluated through
                   vldd.engines.unroll_tail: small-map convolutions as matrix products).
- checkpointed     the same gradient by a hand-written reverse pass, recomputing each step.
- constant-memory  the TESLA / LoRS gradient (an approximation: no second-order terms).
- heads-only       the image encoder not unrolled; only the text head is.

Before any time is reported, the harness checks that reference, exact and checkpointed give
the same gradients for the pixels, the texts and both lrs (relative L2 error <= 1e-4), and
reports how far constant-memory and heads-only are from them. The engines compute the same
function in different orders, so they can agree only where the meta-gradient is a
well-conditioned function of its inputs. When the check fails (or with --sensitivity) the
harness measures that (sensitivity()): the exact engine's gradient again after a random
relative 1e-6 perturbation of theta_0, and separately of the pixels. The theta_0 perturbation
probes the unroll, where the engines differ, and decides: "stable" when no gradient moves by
1e-3 relative L2 (STABLE_BELOW; measured at stable settings: 1.2e-4..2.6e-4, a linear
response, 10x the perturbation giving 10x the change, and the check passed at every one),
"chaotic" from 0.5 or a cosine below 0.9 (an lr gradient changing sign; measured: 0.56 up to
110), "rough" between (measured: 1e-2..0.23, cosines >= 0.97: the gradient is defined to a few
percent, its direction holds; the check passes there or not, depending on whether rounding
happens to cross a kink). The pixel row is reported, not judged: it also crosses the frozen
trunk's ReLU6 kinks, on which the pixel gradient jumps by ~2.5e-3 even at syn_steps 1. Where
the setting is not stable the harness tries smaller student lrs (--search-lrs) and syn_steps
(--search-steps), reports the largest stable ones and exits with status 2 (status 1: the
engines disagree at a stable setting, a bug).

After the check, every engine is measured in a fresh subprocess (so that peak memories do not
mix) at identical settings and seeds: median wall time per iteration, and the peak memory
above the state after setup (model built, data loaded): VmHWM - VmRSS on CPU (the peak is
reset through /proc/self/clear_refs), max_memory_allocated - memory_allocated on CUDA.
Results go to benchmarks/results/*.json (--check-only: the check and the sensitivity only).

One iteration = one meta-gradient: the matching loss and its gradient w.r.t. the distilled
pixels, texts and both lrs (the optimiser step on the data is negligible and left out).

This file is the command line and the timing; the problem and Setup are in unroll_problem.py,
the check and the sensitivity in unroll_check.py, the reference in reference.py, and what the
benchmarks share (child processes, memory probes, tables, results) in harness.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow"))

import torch  # noqa: E402

import harness  # noqa: E402
from unroll_check import (ENGINES, SENSITIVITY_EPS, TOLERANCE, explain_failure,  # noqa: E402
                          precision_label, run_check)
from unroll_problem import LITE0, Setup, args_model_cfg, make_problem  # noqa: E402


# ----------------------------------------------------------------------------- measuring


def child(spec: dict):
    """Measure one engine at one setting; prints one JSON line."""
    import gc

    args = argparse.Namespace(**spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setup(args, spec["problem"])
    engine, steps = spec["engine"], spec["syn_steps"]
    gc.collect()
    base = harness.reset_peak(s.dev)
    times, cpu, loss = [], [], float("nan")
    load0 = os.getloadavg()[0]
    for it in range(spec["warmup"] + spec["iterations"]):
        if s.dev.type == "cuda":
            torch.cuda.synchronize(s.dev)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            loss_t, grads = s.run(engine, it, steps)
        except torch.OutOfMemoryError:
            harness.report({"engine": engine, "syn_steps": steps, "error": "out of memory"})
            return
        if s.dev.type == "cuda":
            torch.cuda.synchronize(s.dev)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        loss = float(loss_t)
        del grads, loss_t
        if it >= spec["warmup"]:
            times.append(dt)
            cpu.append(dc)
    peak = harness.peak(s.dev)
    times_sorted = sorted(times)
    harness.report({
        "engine": engine, "syn_steps": steps, "times_s": times,
        "median_s": times_sorted[len(times) // 2], "min_s": times_sorted[0],
        "cpu_s": cpu, "median_cpu_s": sorted(cpu)[len(cpu) // 2],
        "loadavg_1min": [load0, os.getloadavg()[0]],
        "baseline_mb": base, "peak_mb": peak, "peak_over_setup_mb": peak - base,
        "loss": loss, "threads": torch.get_num_threads()})


def measure(args, problem, engine, steps, iterations, warmup):
    """One engine at one setting, measured by child() in a fresh process."""
    spec = {"args": vars(args), "problem": str(problem), "engine": engine, "syn_steps": steps,
            "iterations": iterations, "warmup": warmup}
    return harness.run_child(__file__, spec, {"engine": engine, "syn_steps": steps})


# ----------------------------------------------------------------------------- report


def print_main(rows, ref):
    print("\nPer iteration (median of the timed iterations; CPU s: the process's CPU time, all "
          "threads; peak: memory above the state after setup; load: the machine's 1-minute load "
          "average before and after, this process included)")
    harness.table_header("engine", "s / iteration", "CPU s / iteration", "peak MB",
                         "absolute peak MB", "speed vs reference", "peak vs reference",
                         "load (1 min) before, after")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | error: {r['error'][:80]} | | | | | | |")
            continue
        sp = mem = "-"
        if ref and "error" not in ref:
            sp = f"{ref['median_s'] / r['median_s']:.2f}x"
            mem = f"{r['peak_over_setup_mb'] / ref['peak_over_setup_mb']:.2f}x"
        la = ", ".join(f"{v:.2f}" for v in r["loadavg_1min"])
        print(f"| {r['engine']} | {r['median_s']:.3f} | {r['median_cpu_s']:.2f} | "
              f"{r['peak_over_setup_mb']:.0f} | {r['peak_mb']:.0f} | {sp} | {mem} | {la} |")


def print_sweep(sweep, steps_list):
    print("\nsyn_steps sweep: peak MB above setup (one iteration each, in a fresh process; its "
          "time is in the JSON)")
    harness.table_header("engine", *(f"K={k}" for k in steps_list))
    by = {}
    for r in sweep:
        by.setdefault(r["engine"], {})[r["syn_steps"]] = r
    for e, cells in by.items():
        out = []
        for k in steps_list:
            r = cells.get(k)
            if r is None:
                out.append("not run")
            elif "error" in r:
                out.append("out of memory" if r["error"] == "out of memory" else "error")
            else:
                out.append(f"{r['peak_over_setup_mb']:.0f}")
        print(f"| {e} | " + " | ".join(out) + " |")


def targets(rows, sweep, trainable="last:1"):
    """The issue's targets, each with holds/misses and its numbers (`trainable` all: the
    whole-encoder ones)."""
    by = {r["engine"]: r for r in rows if "error" not in r}
    sw = {(r["engine"], r["syn_steps"]): r for r in sweep if "error" not in r}
    out = []
    if trainable == "all":
        return whole_encoder_targets(by)
    if "reference" in by and "exact" in by:
        sp = by["reference"]["median_s"] / by["exact"]["median_s"]
        mem = by["exact"]["peak_over_setup_mb"] / by["reference"]["peak_over_setup_mb"]
        out.append(("exact >= 3x faster than reference", sp >= 3, f"{sp:.2f}x"))
        out.append(("exact peak <= 0.5x reference", mem <= 0.5, f"{mem:.2f}x"))
    for e, bound, label in (("checkpointed", 2.0, "checkpointed peak K=32 <= 2x K=4"),
                            ("constant-memory", 1.2, "constant-memory peak flat (<= 20%) K=4..32")):
        a, b = sw.get((e, 4)), sw.get((e, 32))
        if a and b:
            if e == "constant-memory":
                vals = [sw[(e, k)]["peak_over_setup_mb"] for k in (4, 8, 16, 32) if (e, k) in sw]
                ratio = max(vals) / min(vals)
            else:
                ratio = b["peak_over_setup_mb"] / a["peak_over_setup_mb"]
            out.append((label, ratio <= bound, f"{ratio:.2f}x"))
    return out


def whole_encoder_targets(by):
    """At --trainable all: exact >= 2x faster than reference with <= 0.7x its peak;
    checkpointed <= 0.35x reference's peak in <= 1.3x exact's time."""
    out = []
    ref, ex, ck = by.get("reference"), by.get("exact"), by.get("checkpointed")
    if ref and ex:
        sp = ref["median_s"] / ex["median_s"]
        mem = ex["peak_over_setup_mb"] / ref["peak_over_setup_mb"]
        out.append(("exact >= 2x faster than reference", sp >= 2, f"{sp:.2f}x"))
        out.append(("exact peak <= 0.7x reference", mem <= 0.7, f"{mem:.2f}x"))
    if ref and ck:
        mem = ck["peak_over_setup_mb"] / ref["peak_over_setup_mb"]
        out.append(("checkpointed peak <= 0.35x reference", mem <= 0.35, f"{mem:.2f}x"))
    if ex and ck:
        t = ck["median_s"] / ex["median_s"]
        out.append(("checkpointed time <= 1.3x exact", t <= 1.3, f"{t:.2f}x"))
    return out


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="image size in px (default 64)")
    p.add_argument("--budget", type=int, default=50, help="distilled pairs (default 50)")
    p.add_argument("--syn-steps", type=int, default=8, help="inner steps of the main table (8)")
    p.add_argument("--mini-batch", type=int, default=50, help="pairs per inner step (50)")
    p.add_argument("--sweep", default="2,4,8,16,32",
                   help="syn_steps of the memory sweep, comma separated; 'none' skips it")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma separated subset of "
                   + ", ".join(ENGINES))
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per engine (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--trainable", default="last:1",
                   help="model.image_encoder.trainable: all, none or last:K (default last:1, "
                        "the default config)")
    p.add_argument("--image-encoder", default=LITE0[0],
                   help="timm image encoder (default tf_efficientnet_lite0)")
    p.add_argument("--image-weights", default=None,
                   help="its weights: hub, none (random) or package:NAME (default: Lite0's "
                        "package, hub for another encoder)")
    p.add_argument("--lr", type=float, default=0.05, help="student lrs (distill.lr_init)")
    p.add_argument("--expert-epochs", type=int, default=2, help="epochs of the target expert")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="bf16 trunk in the timed runs (the check stays fp32)")
    p.add_argument("--tf32", action="store_true", help="TF32 on CUDA in the timed runs")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW trunk on CUDA")
    p.add_argument("--reference-max-steps", type=int, default=16,
                   help="largest syn_steps of the sweep run with the reference (16: on CPU "
                        "at 64 px it needs ~0.3 GB more per step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--method", default="mtt",
                   choices=["mtt", "lors", "repblend", "ptmst", "covmatch"],
                   help="the inner problem of distill.method: mtt (InfoNCE), lors (WBCE against "
                        "a learned low-rank S, rank 10, alpha 3, moved off the identity; its "
                        "gradient is the fifth leaf), repblend (lors plus representation "
                        "blending; its paper's model is --trainable heads), ptmst (lors with a full "
                        "S, moved off the identity; its shortcut trajectories and moving "
                        "average cost nothing per iteration), covmatch (no "
                        "unroll: one iteration of vldd.covmatch on the distilled pairs and "
                        "256 real pairs, engine 'closed-form'; no gradient check). The "
                        "reference engine runs mtt only")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure the meta-gradient's sensitivity to a relative 1e-6 "
                        "perturbation even when the gradient check passes (it is measured "
                        "whenever the check fails)")
    p.add_argument("--sensitivity-eps", type=float, default=SENSITIVITY_EPS,
                   help="relative size of the perturbations (default 1e-6)")
    p.add_argument("--search-lrs", default="0.05,0.02,0.01,0.005,0.002",
                   help="student lrs tried (those below --lr) when the setting is unstable; "
                        "'none' skips")
    p.add_argument("--search-steps", default="4,2,1",
                   help="syn_steps tried (those below --syn-steps) when the setting is "
                        "unstable; 'none' skips")
    p.add_argument("--check-dtype", default="float32", choices=["float32", "float64"],
                   help="precision of the gradient check, the sensitivity and the search "
                        "(float64 where float32 rounding alone crosses the network's kinks, "
                        "e.g. --trainable all: see benchmarks/README.md); timing is float32")
    p.add_argument("--check-only", action="store_true",
                   help="stop after the gradient check (and the sensitivity): no timing")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32 px, 10 pairs, syn_steps 4, sweep 2,4, 1 iteration")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.budget, args.mini_batch = 32, 10, 10
        args.syn_steps, args.sweep, args.iterations, args.warmup = 4, "2,4", 1, 0
    return args


def write_results(args, stamp, info, payload):
    name = (f"unroll-{'' if args.method == 'mtt' else args.method + '-'}"
            f"{args.device.replace(':', '')}-{args.resolution}px-b{args.budget}-"
            f"k{args.syn_steps}-{stamp.replace(':', '')}.json")
    harness.write_json(args.out, name, {
        "date": stamp, "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "child"}, **payload})


def print_header(args, stamp, info):
    print(f"vldd unroll benchmark, {stamp}; {info['platform']}; torch {info['torch']}; "
          f"device {args.device}; {info['cpu_count']} CPUs, {info['torch_threads']} torch threads"
          + (f"; {info['gpu']}" if "gpu" in info else ""))
    print(f"method {args.method}: {args.image_encoder} "
          f"({args_model_cfg(args)['image_encoder']['weights']}, trainable "
          f"{args.trainable}) + MiniLM text head; "
          f"{args.resolution} px, {args.budget} pairs, syn_steps {args.syn_steps}, mini_batch "
          f"{args.mini_batch}; precision {precision_label(args)}; {args.warmup} warm-up + "
          f"{args.iterations} timed iterations per engine")


def time_engines(args, problem, engines, steps_list):
    """The main table (every engine at --syn-steps) and the syn_steps sweep: (rows, sweep)."""
    rows = [measure(args, problem, e, args.syn_steps, args.iterations, args.warmup)
            for e in engines]
    ref = next((r for r in rows if r["engine"] == "reference"), None)
    print_main(rows, ref)
    sweep = []
    for k in steps_list:
        for e in engines:
            if e == "reference" and k > args.reference_max_steps:
                continue   # its memory grows by a whole encoder graph per step
            sweep.append(measure(args, problem, e, k, 1, 0))
    if steps_list:
        print_sweep(sweep, steps_list)
    return rows, sweep


def print_targets(args, goals):
    default = parse([])
    same = all(getattr(args, k) == getattr(default, k) for k in
               ("resolution", "budget", "syn_steps", "mini_batch", "image_encoder",
                "image_weights")) and args.trainable in ("all", default.trainable)
    print("\nTargets" + ("" if same else " (set for the default setting; this is another)"))
    for label, ok, value in goals:
        print(f"- {label}: {'holds' if ok else 'MISSES'} ({value})")


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if args.method != "mtt" and "reference" in engines:
        engines.remove("reference")
        print(f"(--method {args.method}: the seed code's reference has no similarity matrix; "
              "it is left out)")
    if args.method == "covmatch":    # no unroll: one engine of its own, nothing to compare
        engines = ["closed-form"]
    unknown = set(engines) - set(ENGINES) - {"closed-form"}
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: choose from {ENGINES}")
    steps_list = [] if args.sweep.strip() in ("", "none") else \
        [int(k) for k in args.sweep.split(",")]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = harness.machine()
    print_header(args, stamp, info)
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        problem = Path(tmp) / "problem.pt"
        make_problem(args, problem)
        if args.method == "covmatch":
            payload, bad, sens = {"gradient_check": {}}, False, None
        else:
            payload, bad, sens = run_check(args, problem, engines)
        if bad:
            status = explain_failure(sens, bad, payload["stability_search"],
                                     payload["largest_stable_lr"],
                                     payload["largest_stable_syn_steps"], args)
            write_results(args, stamp, info, {**payload, "status": status})
            return status
        if args.method != "covmatch":
            print(f"OK: reference, exact and checkpointed agree within {TOLERANCE:g}.")
        if sens is not None and not sens["stable"]:
            print(f"(but the setting is {sens['verdict']}: a {sens['eps']:g} perturbation of "
                  f"theta_0 moves the meta-gradient by {sens['max_rel_change']:.1e}; the "
                  "agreement is luck and need not hold at another iteration)")
        if args.check_only:
            write_results(args, stamp, info, {**payload, "status": 0})
            return 0
        rows, sweep = time_engines(args, problem, engines, steps_list)
    goals = targets(rows, sweep, args.trainable)
    if goals:
        print_targets(args, goals)
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"\nwall time {time.time() - t_start:.0f} s; load average at start "
          f"{info.get('loadavg_start')}, at end {info.get('loadavg_end')}")
    write_results(args, stamp, info, {
        **payload, "rows": rows, "sweep": sweep, "status": 0,
        "targets": [{"target": t, "holds": ok, "value": v} for t, ok, v in goals]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
