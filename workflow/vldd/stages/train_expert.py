"""train_expert: train one expert on the full training data and record its trajectory."""
from __future__ import annotations

import logging

from .. import config
from ..checkpoint import EpochStore
from ..experts import data_fingerprint
from ..io import config_hash, provenance
from ..model import build_model, resolve_device
from ..prepared import load_embeddings, load_prepared
from ..realdata import RealData, train_on_real

log = logging.getLogger(__name__)


def train_expert(data_dir, embeddings_path, model_section, expert_cfg, index, out_path,
                 device="auto"):
    """Train expert `index` and write its trajectory to out_path; resumes a killed run from
    the epoch files in `<out_path>.ckpt/`. The sections are vldd.config's typed objects."""
    model_cfg = config.section("model", model_section).as_dict()
    expert_cfg = config.section("experts", expert_cfg)
    dev = resolve_device(device)
    seed = int(expert_cfg.seed) + int(index)
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    train = RealData(prepared, emb, model, "train", dev)
    val = RealData(prepared, emb, model, "val", dev) if len(prepared.split_images("val")) else None
    layouts = model.layouts()
    epochs = int(expert_cfg.epochs)
    section = {"model": model_cfg, "experts": expert_cfg.as_dict()}
    attrs = provenance("trajectory", section, seed=seed,
                       index=int(index), image_encoder=model_cfg["image_encoder"],
                       text_encoder=model_cfg["text_encoder"], n_epochs=epochs,
                       lr_image=float(expert_cfg.lr_image),
                       lr_text=float(expert_cfg.lr_text))
    attrs["n_epochs"] = epochs
    attrs["data_sha256"] = config_hash(data_fingerprint(data_dir, embeddings_path))
    key = config_hash({**section, "index": int(index), "vldd": attrs["vldd_version"],
                       "data": attrs["data_sha256"]})
    store = EpochStore(str(out_path) + ".ckpt", key, model, val, expert_cfg.storage.as_dict())
    train_on_real(model, train, model_cfg, expert_cfg, seed, checkpoint=store,
                  progress=f"train_expert {index}")
    store.assemble(out_path, attrs, layouts, epochs)
