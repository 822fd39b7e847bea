"""What the benchmark scripts share: the machine they ran on, timing, peak-memory probes, one
child process per measurement, markdown tables and the JSON results (benchmarks/results/)."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(ROOT / "workflow"))

from vldd.heap import set_heap_env  # noqa: E402


def machine() -> dict:
    """Platform, Python, torch, CPUs, torch threads, the 1-minute load average now
    (loadavg_start) and the GPU, if any."""
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def best_of(fn, repeats):
    """(best seconds, median seconds, the last result) of `repeats` calls of fn()."""
    times, result = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), sorted(times)[len(times) // 2], result


# ----------------------------------------------------------------------------- peak memory


def proc_mb(key):
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak(dev):
    """Start a peak-memory measurement on `dev`; returns the memory now in MB (CUDA: allocated,
    CPU: the resident set, to which the peak VmHWM is reset)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return proc_mb("VmRSS")


def peak(dev):
    """The peak memory in MB since reset_peak(dev)."""
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return proc_mb("VmHWM")


# ----------------------------------------------------------------------------- child processes


def run_child(script, spec: dict, what: dict) -> dict:
    """Run `script --child JSON(spec)` in a fresh interpreter (so that peak memories do not
    mix) and return the dict its report() printed; when it printed none, `what` (what was
    measured) with the last lines of its stderr as "error"."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    set_heap_env(env)   # the C heap of a pipeline job (vldd.heap), for every engine alike
    proc = subprocess.run([sys.executable, str(script), "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {**what, "error": " | ".join(tail) or f"rc {proc.returncode}"}


def report(result: dict):
    """A child's result, as the one line run_child reads."""
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- output


def table_header(*columns):
    """The header and separator lines of a markdown table."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))


def write_json(out, name, record: dict):
    """record as benchmarks' JSON (indent 1) in the folder `out`, named `name`; prints where."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(record, indent=1))
    print(f"results: {out / name}")
