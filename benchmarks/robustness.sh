#!/usr/bin/env bash
# Does the default config's distillation win whatever the seed and the machine's rounding?
# The default workflow (config/config.yaml, what `make run` runs) with 5 distillation seeds
# (distill.seed 0 and the variants s1..s4 = seeds 1..4, same experts), on two numeric paths:
# the machine's native PyTorch CPU kernels and ATEN_CPU_CAPABILITY=default (the unvectorised
# kernels: another rounding, as another CPU would give). Writes benchmarks/robustness.md:
# per run TR@1 / IR@1 (mean over the evaluation seeds) against the random coreset of the same
# path, the matching loss over the last 20% of iterations relative to the first 20%, and the
# learned lrs against their floor.
#
#   benchmarks/robustness.sh [WORKDIR]
#
# WORKDIR (default benchmarks/results/robustness) gets one run folder per path (not
# committed). Needs snakemake and vldd on PATH (make run builds .venv; then
# PATH=$PWD/.venv/bin:$PATH). About 2 x 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${1:-benchmarks/results/robustness}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
CORES=${CORES:-2}
cat > "$WORK/seeds.yaml" <<'YAML'
distill:
  variants:
    s1: {seed: 1}
    s2: {seed: 2}
    s3: {seed: 3}
    s4: {seed: 4}
YAML
start=$(date +%s)
for path in native default; do
    mkdir -p "$WORK/$path"
    env=()
    [ "$path" = default ] && env=(ATEN_CPU_CAPABILITY=default)
    (cd "$WORK/$path" && env "${env[@]}" snakemake --snakefile "$ROOT/Snakefile" --cores "$CORES" \
        --resources gpu="$CORES" --configfile "$ROOT/config/config.yaml" "$WORK/seeds.yaml" \
        --quiet rules > "$WORK/$path.log" 2>&1) || { echo "run $path failed: $WORK/$path.log" >&2; exit 1; }
done
secs=$(( $(date +%s) - start ))
python - "$WORK" "$secs" "$(git rev-parse --short HEAD)" <<'PY'
import platform
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

work, secs, commit = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]


def cpu_model():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


cfg = yaml.safe_load(open("config/config.yaml"))
lr_min = cfg["distill"].get("lr_min", 0.01)
rows, randoms = [], {}
for path in ("native", "default"):
    res = work / path / "results"
    ev = pd.concat(pd.read_parquet(p) for p in res.glob("*/eval/*/*/n*/seed*.parquet"))
    ev = ev[ev["metric"].isin(["TR@1", "IR@1"])]
    mean = ev.groupby(["method", "metric"])["value"].mean().unstack()
    rnd = mean.loc["coreset-random"]
    randoms[path] = rnd
    for curve_path in sorted(res.glob("*/distilled/*/*/n*/curve.parquet")):
        method = curve_path.parent.parent.name
        c = pd.read_parquet(curve_path)
        k = max(1, len(c) // 5)
        d = mean.loc[f"distilled-{method}"]
        seed = 0 if "_s" not in method else int(method.rsplit("_s", 1)[1])
        rows.append({"path": path, "seed": seed, "TR@1": d["TR@1"], "IR@1": d["IR@1"],
                     "random TR@1": rnd["TR@1"], "random IR@1": rnd["IR@1"],
                     "wins": bool(d["TR@1"] > rnd["TR@1"] and d["IR@1"] > rnd["IR@1"]),
                     "loss last/first": c["matching_loss"][-k:].mean() / c["matching_loss"][:k].mean(),
                     "lr_image": c["lr_image"].iloc[-1], "lr_text": c["lr_text"].iloc[-1]})
df = pd.DataFrame(rows).sort_values(["path", "seed"])
df["R@1 / random"] = (df["TR@1"] + df["IR@1"]) / (df["random TR@1"] + df["random IR@1"])
floor = lambda v: v <= lr_min * (1 + 1e-6)
df["lr on floor"] = [floor(a) or floor(b) for a, b in zip(df["lr_image"], df["lr_text"])]
worst = df.loc[df["R@1 / random"].idxmin()]
lines = [
    "# Robustness of the default distillation: 5 seeds x 2 numeric paths",
    "",
    "Regenerate: `benchmarks/robustness.sh` (the default config, `config/config.yaml`, with",
    "distill.seed 0..4 as variants, run once with the native CPU kernels and once with",
    "`ATEN_CPU_CAPABILITY=default`).",
    f"Run {pd.Timestamp.utcnow():%Y-%m-%d} on {__import__('os').cpu_count()} CPU cores "
    f"({cpu_model()}, {platform.machine()}; native kernels: "
    f"{__import__('torch').backends.cpu.get_cpu_capability()}), no GPU, git {commit}: "
    f"{secs // 60} min {secs % 60} s for both runs.",
    "",
    "Recall in percent, mean over the evaluation seeds of one distilled set; the random",
    "coreset is that path's 50 random real pairs (coresets.seed 0). `loss last/first`: the",
    "mean matching loss over the last 20% of iterations divided by the first 20%.",
    "",
    df.to_markdown(index=False, floatfmt=".3g"),
    "",
    "## Summary",
    "",
    f"- distilled beats random on TR@1 and IR@1 in {int(df['wins'].sum())} of {len(df)} runs",
]
for path, g in df.groupby("path"):
    lines.append(f"- {path}: distilled TR@1 {g['TR@1'].mean():.2f} +- {g['TR@1'].std():.2f}, "
                 f"IR@1 {g['IR@1'].mean():.2f} +- {g['IR@1'].std():.2f} over {len(g)} seeds; "
                 f"random {randoms[path]['TR@1']:.2f} / {randoms[path]['IR@1']:.2f}; "
                 f"mean R@1 {g['R@1 / random'].mean():.2f}x random")
lines += [
    f"- worst run: {worst['path']} seed {worst['seed']}: TR@1 {worst['TR@1']:.2f}, "
    f"IR@1 {worst['IR@1']:.2f} ({worst['R@1 / random']:.2f}x random)",
    f"- loss last/first: max {df['loss last/first'].max():.3f} (target <= 0.7); "
    f"learned lrs on their floor ({lr_min}) in {int(df['lr on floor'].sum())} of {len(df)} runs",
]
Path("benchmarks/robustness.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
