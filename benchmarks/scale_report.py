"""The table of benchmarks/scale.sh: each stage's wall time and peak RSS per dataset size
(from the rules' benchmark files) and the growth of its peak from the smallest size to the
largest.

    python benchmarks/scale_report.py WORK SECONDS COMMIT COMMAND BASE RESOLUTION SCALE...
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd

from emoji_report import cpu_model   # (beside this file)

# stage label -> the benchmark file under results/benchmarks/scale/ (glob)
STAGES = [("prepare_dataset", "prepare_dataset.tsv"),
          ("embed_captions", "embed_captions_*.tsv"),
          ("select_coreset random", "coresets/*/random/n*.tsv"),
          ("select_coreset herding", "coresets/*/herding/n*.tsv"),
          ("train_expert (1 epoch)", "experts/*/expert_0.tsv"),
          ("evaluate (random coreset)", "eval/*/coreset-random/n*/seed0.tsv")]
# the stages whose memory may grow with the data (they stream, but hold the generator's or
# the embedder's whole output)
EXEMPT = ("prepare_dataset", "embed_captions")


def measure(work: Path, scale: str):
    out = {}
    for label, pattern in STAGES:
        files = sorted((work / f"x{scale}" / "results" / "benchmarks" / "scale").glob(pattern))
        if files:
            b = pd.read_csv(files[0], sep="\t")
            out[label] = (float(b["s"].iloc[-1]), float(b["max_rss"].iloc[-1]))
    return out


def main():
    work, secs, commit, command, base, res = sys.argv[1:7]
    scales = sys.argv[7:]
    work = Path(work)
    data = {s: measure(work, s) for s in scales}
    first, last = scales[0], scales[-1]
    lines = ["# Time and peak memory per stage against the dataset's size", "",
             f"Regenerate: `{command}`: the synthetic source at {', '.join(f'{s}x' for s in scales)} "
             f"of {base} training images ({res} px, 5 captions each; val 100 and test 200 images "
             "at every size), config/config.yaml otherwise (model `lite0-minilm`, Lite0 with its "
             "last block trained); one expert of one epoch, a random and a herding coreset of 50 "
             "pairs, one evaluation of the random coreset.",
             f"Run {pd.Timestamp.now():%Y-%m-%d} on {os.cpu_count()} CPU cores ({cpu_model()}), "
             f"no GPU, git {commit}: {int(secs) // 60} min {int(secs) % 60} s wall for the whole "
             f"command (load average {os.environ.get('LOADS', '?')}).", "",
             "Each cell: the job's wall time in seconds / its peak resident memory in MB "
             "(Snakemake's benchmark file of the rule: the whole job, interpreter and imports "
             f"included). Growth: peak at {last}x over peak at {first}x; the target is below 1.5x "
             f"for every stage but {' and '.join(EXEMPT)}.", "",
             "| stage | " + " | ".join(f"{s}x ({int(base) * int(s)} images)" for s in scales)
             + f" | peak growth {first}x -> {last}x |",
             "|---|" + "---|" * len(scales) + "---|"]
    for label, _ in STAGES:
        cells = []
        for s in scales:
            v = data[s].get(label)
            cells.append("-" if v is None else f"{v[0]:.0f} s / {v[1]:.0f} MB")
        a, b = data[first].get(label), data[last].get(label)
        growth = "-" if not (a and b) else f"{b[1] / a[1]:.2f}x"
        mark = " (exempt)" if label.startswith(EXEMPT) else ""
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {growth}{mark} |")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
