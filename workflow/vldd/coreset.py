"""select_coreset: N real training pairs chosen by a rule, written as a pair set."""
from __future__ import annotations

import numpy as np

from .data import load_prepared
from .embed import load_embeddings
from .encoders import build_image_encoder, to_model_input
from .errors import VlddError
from .io import provenance
from .pairset import PairSet, write_pairset

KINDS = ("random",)


def random_pairs(prepared, budget: int, seed: int, where: str = "budget") -> np.ndarray:
    """Caption ids of `budget` training pairs: distinct images, one random caption each."""
    train_images = prepared.split_images("train")
    if budget > len(train_images):
        raise VlddError(f"{where} = {budget} is larger than the training set "
                        f"({len(train_images)} images): choose a budget <= {len(train_images)}.")
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(train_images, size=budget, replace=False))
    caps = prepared.captions
    out = []
    for img in chosen:
        ids = caps.loc[caps["image_index"] == img, "caption_id"].to_numpy()
        out.append(int(ids[rng.integers(len(ids))]))
    return np.asarray(out, dtype=np.int64)


def real_pairs(prepared, embeddings, caption_ids, mean, std):
    """(normalised images [n,3,H,W], embeddings [n,d]) of the given caption ids."""
    caps = prepared.captions.set_index("caption_id")
    img_idx = caps.loc[caption_ids, "image_index"].to_numpy()
    images = to_model_input(prepared.images[img_idx], mean, std).numpy()
    return images, embeddings[caption_ids]


def select_coreset(data_dir, embeddings_path, model_cfg, kind, budget, seed, out_path):
    if kind not in KINDS:
        raise VlddError(f"coreset kind '{kind}' is not known: choose one of {KINDS}.")
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
    spec = model_cfg["image_encoder"]
    # Only the normalisation of the encoder is needed here, not its weights.
    tower = build_image_encoder({**spec, "trainable": "all"})
    ids = random_pairs(prepared, budget, seed)
    images, texts = real_pairs(prepared, emb, ids, tower.mean, tower.std)
    ps = PairSet(images, texts, ids, kind="coreset", method=kind, mean=tower.mean, std=tower.std)
    write_pairset(out_path, ps, provenance("pairset", {"model": model_cfg, "kind": kind,
                                                       "budget": budget, "seed": seed},
                                           seed=seed))
