"""What limits the matching loss of a finished distillation: the targets' own noise, the
student's learned lrs, or the direction of the student's displacement.

For a run's experts and one distilled pair set (results/<dataset>/...), this prints:

1. The noise floor of the targets. From expert 0's recorded epoch s, the expert's training is
   rerun for expert_epochs epochs with --replicas other seeds (batch order and dropout). Half
   the mean normalised distance between two replicas, |d_a - d_b|^2 / 2|d_rec|^2, is the share
   of a target's displacement that no deterministic student can predict: the floor of a
   matching term. The replicas' norm against the recorded one checks that they are the same
   training.
2. The student over every (expert, start epoch) target of the run, on the initial real pairs
   (at distill.lr_init) and on the distilled pairs (at their learned lrs): each matching
   term, the cosine between the student's displacement and the expert's, and the term with the
   displacement rescaled by its best single factor and by its best factor per parameter
   tensor (what learned per-tensor lrs could give at most, to first order).

Scripts, not tests: run from the repository root with the project's Python, e.g.

    .venv/bin/python benchmarks/matching_floor.py . --budget 50

after `make run` (about 3 minutes on 2 CPU cores). Writes the tables to stdout and a JSON file
under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow"))

from vldd.stages.distill import Distiller  # noqa: E402
from vldd.engines import Unroll, distilled_trunk_features, unroll  # noqa: E402
from vldd.realdata import RealData, train_on_real  # noqa: E402
from vldd.pairset import read_pairset  # noqa: E402
from vldd.train import train_mode  # noqa: E402

GROUPS = ("image", "text")


def module_of(model, group):
    return model.tail if group == "image" else model.head


def set_params(model, layout, group, flat):
    values = layout.unflatten(flat)
    with torch.no_grad():
        for name, p in module_of(model, group).named_parameters():
            if p.requires_grad:
                p.copy_(values[name])


def get_params(model, group):
    return torch.cat([p.detach().reshape(-1) for p in module_of(model, group).parameters()
                      if p.requires_grad])


def noise_floor(distiller, data, model_cfg, expert_cfg, starts, replicas, epochs):
    """Per start epoch and group: replica-vs-replica distance / 2 and replica norm ratio."""
    expert = distiller.experts[0]
    model = distiller.model
    cfg = dict(expert_cfg, epochs=epochs)
    rows = []
    for s in starts:
        start = {g: expert.params(g, s) for g in GROUPS}
        recorded = {g: expert.params(g, s + epochs) - start[g] for g in GROUPS}
        ends = []
        for r in range(replicas):
            for g in GROUPS:
                set_params(model, expert.layouts[g], g, start[g])
            train_on_real(model, data, model_cfg, cfg, seed=1000 + 17 * r)
            ends.append({g: get_params(model, g) - start[g] for g in GROUPS})
        for g in GROUPS:
            den = float(recorded[g].pow(2).sum())
            pairs = [(a, b) for a in range(replicas) for b in range(a + 1, replicas)]
            spread = sum(float((ends[a][g] - ends[b][g]).pow(2).sum()) for a, b in pairs)
            rows.append({"start": s, "group": g,
                         "noise_share": spread / len(pairs) / den / 2,
                         "norm_ratio": sum(float(e[g].norm()) for e in ends)
                         / replicas / den ** 0.5})
    return rows


def student_fit(distiller, pixels, texts, lr_img, lr_txt, syn_steps, expert_epochs, starts):
    """Mean over targets, per group: term, cosine, term at the best scale and per tensor. The
    student takes syn_steps full-batch steps (every pair, in order) from each start."""
    model, layouts = distiller.model, distiller.layouts
    scale = distiller.scale
    train_mode(model)
    torch.manual_seed(0)
    feats = distilled_trunk_features(model, pixels, distiller.opts, grad=False).detach()
    sums = {g: {"term": 0.0, "cosine": 0.0, "best_scale": 0.0, "per_tensor": 0.0} for g in GROUPS}
    n = 0
    for expert in distiller.experts:
        for s in starts:
            start = {g: expert.params(g, s) for g in GROUPS}
            target = {g: expert.params(g, s + expert_epochs) for g in GROUPS}
            u = Unroll(model, layouts, start, target, syn_steps, mini_batch=None, scale=scale,
                       gen=None, opts=distiller.opts)
            end = unroll(u, feats, texts, lr_img, lr_txt)
            for g in GROUPS:
                moved, wanted = end[g].detach() - start[g], target[g] - start[g]
                den = float(wanted.pow(2).sum())
                dot, mm = float((moved * wanted).sum()), float(moved.pow(2).sum())
                acc = sums[g]
                acc["term"] += float((moved - wanted).pow(2).sum()) / den
                acc["cosine"] += dot / (mm ** 0.5 * den ** 0.5) if mm > 0 else 0.0
                acc["best_scale"] += (den - (dot * dot / mm if mm > 0 else 0.0)) / den
                residual = 0.0
                for x, y in zip(layouts[g].unflatten(moved).values(),
                                layouts[g].unflatten(wanted).values()):
                    xx, xy = float(x.pow(2).sum()), float((x * y).sum())
                    residual += float(y.pow(2).sum()) - (xy * xy / xx if xx > 0 else 0.0)
                acc["per_tensor"] += residual / den
            n += 1
    return {g: {k: v / n for k, v in d.items()} for g, d in sums.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished run's folder (holding results/)")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--model", default="lite0-minilm")
    ap.add_argument("--method", default="mtt")
    ap.add_argument("--budget", type=int, default=50)
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--noise-starts", type=int, nargs="+", default=[0, 2, 4, 6])
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    root = a.run / "results" / a.dataset
    pairs_path = root / "distilled" / a.model / a.method / f"n{a.budget}" / "pairs.h5"
    ps = read_pairset(pairs_path)
    section = json.loads(ps.attrs["config_json"])
    model_cfg, dcfg = section["model"], section["distill"]
    experts = sorted((root / "experts" / a.model).glob("expert_*.h5"))
    emb = root / "embeddings" / f"{model_cfg['text_encoder']['name']}.h5"
    t0 = time.time()
    distiller = Distiller(root / "data", emb, experts, model_cfg, dcfg, a.budget, "cpu")
    expert_cfg = json.loads(distiller.experts[0].attrs["config_json"])["experts"]
    R, steps = int(dcfg["expert_epochs"]), int(dcfg["syn_steps"])
    starts = list(range(int(dcfg["max_start_epoch"])))
    print(f"# Matching-loss floor: {pairs_path}\n")
    print(f"{len(experts)} experts, start epochs {starts[0]}..{starts[-1]}, expert_epochs {R}, "
          f"syn_steps {steps}, budget {a.budget}, torch {torch.__version__}, "
          f"{a.threads} threads\n")

    from vldd.prepared import load_prepared
    from vldd.prepared import load_embeddings
    prepared = load_prepared(root / "data")
    data = RealData(prepared, load_embeddings(emb, root / "data", model_cfg["text_encoder"]),
                    distiller.model, "train", "cpu")
    noise = noise_floor(distiller, data, model_cfg, expert_cfg, a.noise_starts, a.replicas, R)
    print(f"## 1. Noise floor of the targets (expert 0, {a.replicas} replicas of {R} epochs)\n")
    print("| start epoch | group | noise share (floor of the term) | replica / recorded norm |")
    print("|---|---|---|---|")
    for r in noise:
        print(f"| {r['start']} | {r['group']} | {r['noise_share']:.3f} | {r['norm_ratio']:.2f} |")

    fits = {
        "real pairs at lr_init": student_fit(
            distiller, distiller.images.detach(), distiller.texts.detach(),
            float(dcfg["lr_init"]), float(dcfg["lr_init"]), steps, R, starts),
        "distilled pairs at their lrs": student_fit(
            distiller, torch.as_tensor(ps.images).float(), torch.as_tensor(ps.texts).float(),
            float(ps.lr_image), float(ps.lr_text), steps, R, starts),
    }
    print(f"\n## 2. The student over all {len(experts) * len(starts)} targets\n")
    print("| data | group | term | cosine | term at the best scale "
          "| at the best scale per tensor |")
    print("|---|---|---|---|---|---|")
    for name, fit in fits.items():
        for g in GROUPS:
            f = fit[g]
            print(f"| {name} | {g} | {f['term']:.3f} | {f['cosine']:.3f} | "
                  f"{f['best_scale']:.3f} | {f['per_tensor']:.3f} |")
    print(f"\n{time.time() - t0:.0f} s")
    out = REPO / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y-%m-%dT%H%M%S")
    (out / f"matching-floor-{a.dataset}-n{a.budget}-{stamp}.json").write_text(json.dumps(
        {"pairs": str(pairs_path), "noise": noise, "fits": fits}, indent=1))


if __name__ == "__main__":
    main()
