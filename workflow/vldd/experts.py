"""train_expert: train one expert on the full training data and record its trajectory."""
from __future__ import annotations

import logging

import torch

from .data import load_prepared
from .embed import load_embeddings
from .io import h5_writer, provenance
from .model import build_model, logit_scale, resolve_device, retrieval, trunk_features
from .train import train_contrastive
from . import trajectory

log = logging.getLogger(__name__)

METRIC_ORDER = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")


class RealData:
    """Trunk features of the real images of a split, and the split's (image, caption) pairs.

    The trunk is frozen, so its features are computed once for the whole split.
    """

    def __init__(self, prepared, embeddings, model, split, device):
        self.image_ids = prepared.split_images(split)
        pos = {int(i): k for k, i in enumerate(self.image_ids)}
        caps = prepared.split_captions(split)
        self.caption_ids = caps["caption_id"].to_numpy()
        self.pair_img = torch.as_tensor([pos[int(i)] for i in caps["image_index"]],
                                        dtype=torch.long)
        self.texts = torch.as_tensor(embeddings[self.caption_ids]).to(device)
        self.feats = trunk_features(model.tower, prepared.images[self.image_ids], device)
        self.pair_txt = torch.arange(len(self.caption_ids))

    def __len__(self):
        return len(self.image_ids)

    def recall(self, model):
        return retrieval(model, self.feats, self.texts, self.pair_img.numpy())


def train_on_real(model, data: RealData, model_cfg, cfg, seed, on_epoch_end=None):
    """The training loop on real pairs with the settings of an `experts` or `full` section."""
    return train_contrastive(
        model, data.feats, data.texts, data.pair_img, data.pair_txt, epochs=int(cfg["epochs"]),
        lr_image=float(cfg["lr_image"]), lr_text=float(cfg["lr_text"]),
        momentum=float(cfg.get("momentum", 0.0)), weight_decay=float(cfg.get("weight_decay", 0.0)),
        batch_size=int(cfg["batch_size"]), logit_scale=logit_scale(model_cfg), seed=seed,
        per_image=cfg.get("sample", "captions") == "images", on_epoch_end=on_epoch_end)


def train_expert(data_dir, embeddings_path, model_cfg, expert_cfg, index, out_path,
                 device="auto"):
    dev = resolve_device(device)
    seed = int(expert_cfg.get("seed", 0)) + int(index)
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    train = RealData(prepared, emb, model, "train", dev)
    val = RealData(prepared, emb, model, "val", dev) if len(prepared.split_images("val")) else None
    layouts = model.layouts()
    epochs = int(expert_cfg["epochs"])
    attrs = provenance("trajectory", {"model": model_cfg, "experts": expert_cfg}, seed=seed,
                       index=int(index), image_encoder=model_cfg["image_encoder"],
                       text_encoder=model_cfg["text_encoder"], n_epochs=epochs,
                       lr_image=float(expert_cfg["lr_image"]),
                       lr_text=float(expert_cfg["lr_text"]))
    attrs["n_epochs"] = epochs
    with h5_writer(out_path, attrs) as f:
        trajectory.create(f, layouts, epochs)

        def record(epoch, loss=None):
            trajectory.write_row(f, epoch, {"image": trajectory.flatten(model.tail.parameters()),
                                            "text": trajectory.flatten(model.head.parameters())})
            if loss is None:
                return
            f["metrics"]["loss"][epoch - 1] = loss
            if val is not None:
                r = val.recall(model)
                f["metrics"]["val"][epoch - 1] = [r[k] for k in METRIC_ORDER]
                log.info("expert %s epoch %d loss %.4f val %s", index, epoch, loss,
                         " ".join(f"{k}={r[k]:.1f}" for k in METRIC_ORDER))
            else:
                log.info("expert %s epoch %d loss %.4f", index, epoch, loss)

        record(0)
        train_on_real(model, train, model_cfg, expert_cfg, seed, on_epoch_end=record)
