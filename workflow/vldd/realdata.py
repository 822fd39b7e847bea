"""Real training pairs as the training loop consumes them, and training on them (experts,
the full-data upper bound, the forgetting coreset). And the real (or noise) pairs a distillation starts from."""
from __future__ import annotations

import numpy as np
import torch

from . import config
from .encoders import to_model_input
from .model import logit_scale, real_features, retrieval
from .pairset import random_pairs
from .train import train_contrastive


class RealData:
    """Trunk features of the real images of a split, and the split's (image, caption) pairs.

    The trunk is frozen, so its features are computed once for the whole split; without a
    trunk (`trainable: all` or `lora`) the uint8 images are normalised per batch instead
    (model.PixelBatches).
    """

    def __init__(self, prepared, embeddings, model, split, device):
        self.image_ids = prepared.split_images(split)
        pos = {int(i): k for k, i in enumerate(self.image_ids)}
        caps = prepared.split_captions(split)
        self.caption_ids = caps["caption_id"].to_numpy()
        self.pair_img = torch.as_tensor([pos[int(i)] for i in caps["image_index"]],
                                        dtype=torch.long)
        self.texts = torch.as_tensor(embeddings[self.caption_ids]).to(device)
        # the split's images are read batch by batch (a lazy view), never all at once
        self.feats = real_features(model.tower, prepared.images.view(self.image_ids), device)
        self.pair_txt = torch.arange(len(self.caption_ids))

    def __len__(self):
        return len(self.image_ids)

    def recall(self, model):
        return retrieval(model, self.feats, self.texts, self.pair_img.numpy())


def train_on_real(model, data: RealData, model_cfg, cfg, seed, **hooks):
    """The training loop on real pairs with the settings of an `experts` or `full` section
    (a vldd.config typed object); `hooks`: train_contrastive's on_epoch_end, on_batch,
    checkpoint and progress."""
    if isinstance(cfg, dict):   # a partial section from Python code: the schema's defaults
        cfg = config.section("experts", cfg)
    return train_contrastive(
        model, data.feats, data.texts, data.pair_img, data.pair_txt, epochs=int(cfg.epochs),
        lr_image=float(cfg.lr_image), lr_text=float(cfg.lr_text),
        momentum=float(cfg.momentum), weight_decay=float(cfg.weight_decay),
        batch_size=int(cfg.batch_size), logit_scale=logit_scale(model_cfg), seed=seed,
        per_image=cfg.sample == "images", **hooks)


def real_pairs(prepared, embeddings, caption_ids, mean, std):
    """(normalised images [n,3,H,W], embeddings [n,d]) of the given caption ids."""
    caps = prepared.captions.set_index("caption_id")
    img_idx = caps.loc[caption_ids, "image_index"].to_numpy()
    images = to_model_input(prepared.images[img_idx], mean, std).numpy()
    return images, embeddings[caption_ids]


# Noise initialisation statistics of the seed code (normalised pixels, BERT [CLS] space).
NOISE_IMAGE = ((-0.0626, -0.0221, 0.0680), (1.0451, 1.0752, 1.0539))


def initial_pairs(prepared, emb, budget, cfg, tower):
    """(caption ids, images, texts) the distilled set starts from: random real pairs, or
    noise per modality (distill.init; caption ids -1 for noise images)."""
    ids = random_pairs(prepared, budget, cfg.seed, where="distill budget")
    images, texts = real_pairs(prepared, emb, ids, tower.mean, tower.std)
    g = torch.Generator().manual_seed(cfg.seed)
    images, texts = torch.as_tensor(images), torch.as_tensor(texts)
    if cfg.init.image == "noise":
        m = torch.tensor(NOISE_IMAGE[0]).view(1, 3, 1, 1)
        s = torch.tensor(NOISE_IMAGE[1]).view(1, 3, 1, 1)
        images = torch.randn(images.shape, generator=g) * s + m
        ids = np.full_like(ids, -1)
    if cfg.init.text == "noise":
        texts = torch.randn(texts.shape, generator=g) * texts.std() + texts.mean()
    return ids, images, texts
