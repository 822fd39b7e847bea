"""evaluate and train_full: train a fresh model, then measure test retrieval.

Both write one long-format Parquet table: one row per metric (TR/IR @ 1/5/10) with the
dataset, method, budget and seed, plus provenance in the file metadata.
"""
from __future__ import annotations

import logging
import math

import numpy as np
import pandas as pd
import torch

from .. import config, phases
from ..errors import VlddError
from ..experts import data_fingerprint
from ..io import config_hash, provenance, write_parquet
from ..metrics import METRIC_ORDER
from ..model import build_model, logit_scale, resolve_device, trunk_features
from ..pairset import check_pairset, read_pairset
from ..prepared import load_embeddings, load_prepared
from ..realdata import RealData, train_on_real
from ..train import train_contrastive

log = logging.getLogger(__name__)


def _frame(metrics: dict, dataset, method, budget, seed, stage, model=""):
    rows = [{"dataset": dataset, "model": model, "method": method, "budget": int(budget),
             "seed": int(seed),
             "stage": stage, "direction": m.split("@")[0], "k": int(m.split("@")[1]),
             "metric": m, "value": float(metrics[m])} for m in METRIC_ORDER]
    return pd.DataFrame(rows)


def renormalise(images, mean, std, to_mean, to_std):
    """Pixels normalised with (mean, std) into the normalisation of another image encoder
    (cross-architecture evaluation); unchanged when the two agree."""
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    to_mean, to_std = np.asarray(to_mean, np.float32), np.asarray(to_std, np.float32)
    if np.allclose(mean, to_mean) and np.allclose(std, to_std):
        return images
    shape = (1, -1, 1, 1)
    raw = images * std.reshape(shape) + mean.reshape(shape)
    return ((raw - to_mean.reshape(shape)) / to_std.reshape(shape)).astype(np.float32)


def r_mean(metrics: dict) -> float:
    return float(np.mean([metrics[k] for k in METRIC_ORDER]))


def eval_lrs(ps, eval_cfg, path="pair set", stored=None):
    """The lrs to train on a pair set (or on one of its phases, whose lrs are `stored`):
    learned ones when the set has them (and config wants them), else the configured default
    (coresets; covmatch's distilled sets, which learn no lrs). The seed code used the image lr
    for both encoders.
    Refuses learned lrs that are not finite and positive (a negative lr is gradient ascent)."""
    lr_img, lr_txt = float(eval_cfg.lr), float(eval_cfg.lr)
    mine_img, mine_txt = (ps.lr_image, ps.lr_text) if stored is None else stored
    learned = eval_cfg.use_learned_lr and not (math.isnan(mine_img) and math.isnan(mine_txt))
    if learned and not all(math.isfinite(v) and v > 0 for v in (mine_img, mine_txt)):
        raise VlddError(f"{path}: learned lrs lr_image {mine_img:.4g}, lr_text "
                        f"{mine_txt:.4g} are not finite and positive (training on it would "
                        "diverge or ascend the loss). Redistill with distill.lr_min > 0, or "
                        "evaluate with evaluate.use_learned_lr: false.")
    if learned:
        lr_img = mine_img
        lr_txt = mine_img if eval_cfg.quirk_image_lr_for_both else mine_txt
    return lr_img, lr_txt


def _read_evaluable(pairset_path, data_dir, embeddings_path, text_cfg):
    """The pair set, the prepared data and the embeddings, after refusing a pair set made
    from other data or for another text encoder."""
    ps = read_pairset(pairset_path)
    check_pairset(pairset_path, ps)
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, text_cfg)
    theirs = ps.attrs.get("data_sha256")
    if theirs is not None and theirs != config_hash(data_fingerprint(data_dir, embeddings_path)):
        raise VlddError(f"{pairset_path}: made from other data than {data_dir} with "
                        f"{embeddings_path} (another dataset, caption set or text encoder). "
                        "Evaluate it on the data it was made from, or remake it for this data.")
    if ps.texts.shape[1] != emb.shape[1]:
        raise VlddError(f"{pairset_path}: text embeddings of size {ps.texts.shape[1]}, but the "
                        f"text encoder gives {emb.shape[1]}. Evaluate with the encoder it was "
                        "made for.")
    return ps, prepared, emb


def evaluate(data_dir, embeddings_path, pairset_path, model_section, eval_cfg, seed, out_path,
             dataset="", device="auto"):
    """Train a fresh model on the pair set and write its test retrieval to out_path (the
    sections are vldd.config's typed objects)."""
    model_section = config.section("model", model_section)
    model_cfg, eval_cfg = model_section.as_dict(), config.section("evaluate", eval_cfg)
    dev = resolve_device(device)
    ps, prepared, emb = _read_evaluable(pairset_path, data_dir, embeddings_path,
                                        model_cfg["text_encoder"])
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    images = renormalise(ps.images, ps.mean, ps.std, model.tower.mean, model.tower.std)
    feats = trunk_features(model.tower, images, dev, normalized=True)
    texts = torch.as_tensor(ps.texts).to(dev)
    lr_img, lr_txt = eval_lrs(ps, eval_cfg, pairset_path)
    test = RealData(prepared, emb, model, "test", dev)
    parts = phases.parts(ps)     # one part, or the phases of distill.phases in their order
    epochs = int(eval_cfg.epochs)
    best = {"epoch": None, "metrics": None}

    def keep_best(epoch, _loss=None):
        """The seed code's model selection on the test split: test every k epochs (and
        before training), report the checkpoint with the best mean recall."""
        every = int(eval_cfg.quirk_test_every)
        if epoch % every and epoch != epochs * len(parts):
            return
        m = test.recall(model)
        if best["metrics"] is None or r_mean(m) > r_mean(best["metrics"]):
            best.update(epoch=epoch, metrics=m)

    quirk_best = bool(eval_cfg.quirk_best_test_checkpoint)
    if quirk_best:
        keep_best(0)
    for i, (ids, stored, block) in enumerate(parts):   # LoRS: the weighted BCE against S
        if eval_cfg.loss == "infonce" or (eval_cfg.loss == "wbce" and block is None):
            block = None if eval_cfg.loss == "infonce" else np.eye(len(ids), dtype=np.float32)
        ids = torch.as_tensor(ids)
        lrs = eval_lrs(ps, eval_cfg, pairset_path, stored)
        train_contrastive(model, feats, texts, ids, ids, epochs=epochs, lr_image=lrs[0],
                          lr_text=lrs[1], momentum=float(eval_cfg.momentum),
                          weight_decay=float(eval_cfg.weight_decay),
                          batch_size=int(eval_cfg.batch_size),
                          logit_scale=logit_scale(model_cfg), seed=phases.phase_seed(seed, i),
                          on_epoch_end=(lambda e, _l, o=i * epochs: keep_best(o + e))
                          if quirk_best else None,
                          progress=f"evaluate {ps.kind}-{ps.method} n{ps.budget} seed {seed}"
                          + (f" phase {i}" if len(parts) > 1 else ""),
                          targets=None if block is None else torch.as_tensor(block).to(dev))
    if quirk_best:
        metrics, reported = best["metrics"], best["epoch"]
    else:
        metrics, reported = test.recall(model), epochs * len(parts)
    log.info("%s %s n=%d seed=%d epoch %d: %s", ps.kind, ps.method, ps.budget, seed, reported,
             " ".join(f"{k}={metrics[k]:.2f}" for k in METRIC_ORDER))
    method = f"{'distilled' if ps.kind == 'distilled' else 'coreset'}-{ps.method}"
    df = _frame(metrics, dataset, method, ps.budget, seed, "evaluate", model_section.name)
    df["lr_image"], df["lr_text"] = lr_img, lr_txt
    df["epoch"] = reported
    prov = provenance("eval", {"model": model_cfg, "evaluate": eval_cfg.as_dict()}, seed=seed,
                      pairset=str(pairset_path))
    write_parquet(df, out_path, meta=prov)


def train_full(data_dir, embeddings_path, model_section, full_cfg, seed, out_path, dataset="",
               device="auto"):
    """The upper bound: the same loop on all training pairs."""
    model_section = config.section("model", model_section)
    model_cfg, full_cfg = model_section.as_dict(), config.section("full", full_cfg)
    dev = resolve_device(device)
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    train = RealData(prepared, emb, model, "train", dev)
    train_on_real(model, train, model_cfg, full_cfg, seed, progress=f"train_full seed {seed}")
    metrics = RealData(prepared, emb, model, "test", dev).recall(model)
    log.info("full data seed=%d: %s", seed, " ".join(f"{k}={metrics[k]:.2f}" for k in METRIC_ORDER))
    df = _frame(metrics, dataset, "full", len(train), seed, "train_full",
                model_section.name)
    write_parquet(df, out_path, meta=provenance("eval", {"model": model_cfg,
                                                         "full": full_cfg.as_dict()},
                                                 seed=seed))
