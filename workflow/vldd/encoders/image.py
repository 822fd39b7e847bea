"""The image tower: a timm model with its weights, cut into a frozen trunk and a trained tail.

build_image_encoder creates the timm model by name with pooled features (num_classes=0),
loads it from its weight source (a package's file mapped tensor by tensor, a local state
dict, the hub, or none), freezes its BatchNorm statistics and splits it by `trainable`
(vldd.encoders.split). Pixels enter the tower in the encoder's own normalisation,
to_model_input's job; image_normalisation reads it without building the model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from ..config import filled
from ..errors import VlddError
from .split import split_tower
from .weights import _load_state_dict_file, _split_source, package_image_file


@dataclass
class ImageTower:
    """An image encoder split into a frozen trunk and a trainable tail.

    features(x) = tail(trunk(x)). Only the tail's parameters that require grad are trained,
    recorded in expert trajectories and unrolled in distillation (with trainable lora the
    tail is the whole frozen encoder and only its adapters require grad); the trunk runs once
    per batch of pixels, so its output can be cached for real images and computed once per
    distillation iteration. num_features is the size of the pooled feature.
    """
    trunk: nn.Module
    tail: nn.Module
    num_features: int
    mean: tuple
    std: tuple


def build_image_encoder(spec: dict, seed: int = 0) -> ImageTower:
    """A timm model by name with its pooled features (num_classes=0: the pooled feature of
    size num_features, never classifier logits), a weight source and a trainable part.

    `spec.kwargs` go to timm.create_model (e.g. img_size for a ViT on small images); `seed`
    draws the LoRA A matrices when `trainable` is lora and `spec.lora.seed` is null. Keys
    `spec` lacks take the schema's defaults (model.image_encoder).
    """
    spec = filled("model.image_encoder", spec)
    model = _timm_model(spec)
    if getattr(model, "num_classes", 0) != 0:
        raise VlddError(f"timm '{spec['name']}' still has a classifier ({model.num_classes} "
                        "outputs); vldd needs its pooled features.")
    cfg = model.pretrained_cfg or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    # Frozen statistics: BatchNorm runs on its pretrained running stats everywhere
    # (experts, unroll, evaluation), so the unroll is a smooth function of the parameters.
    model.eval()
    # The pooled feature (forward_head(pre_logits)) has head_hidden_size where a model has a
    # pre-logits layer after pooling (MobileNetV3); num_features elsewhere.
    num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    trunk, tail = split_tower(model, spec["trainable"], spec["lora"], seed)
    trunk.requires_grad_(False)
    _unfuse_attention(tail)
    return ImageTower(trunk, tail, num_features, mean, std)


def _timm_model(spec: dict) -> nn.Module:
    """The timm model `spec.name` with the weights of `spec.weights` and no classifier."""
    import timm

    name, weights = spec["name"], spec["weights"]
    kind, arg = _split_source(weights)
    kwargs = _timm_kwargs(spec)
    if kind == "package":
        return _from_package(timm, name, arg, kwargs)
    if kind == "file":
        return _from_file(timm, name, arg, kwargs)
    try:
        return timm.create_model(name, pretrained=(kind == "hub"), num_classes=0, **kwargs)
    except Exception as exc:  # noqa: BLE001 - hub failures come in many types
        raise VlddError(f"cannot create timm model '{name}' with weights '{weights}': {exc}. "
                        "Offline, use a weights package or file:PATH.") from exc


def _from_package(timm, name: str, package: str, kwargs: dict) -> nn.Module:
    """timm `name` with the weights of an installed weights package."""
    path = package_image_file(package, name)
    state = _load_state_dict_file(path)
    model = _create_model(timm, name, kwargs, pretrained=False)
    # The package's tensors map one to one, in order, onto timm's (different key names).
    targets = model.state_dict()
    if len(state) != len(targets) or any(
            tuple(v.shape) != tuple(t.shape) for v, t in zip(state.values(), targets.values())):
        raise VlddError(f"weights in {path} do not match timm '{name}' tensor by tensor.")
    model.load_state_dict(dict(zip(targets.keys(), state.values())), strict=True)
    model.reset_classifier(0)
    return model


def _from_file(timm, name: str, path: str, kwargs: dict) -> nn.Module:
    """timm `name` with the weights of a local state dict, its classifier left out."""
    model = _create_model(timm, name, kwargs, pretrained=False, num_classes=0)
    state = _load_state_dict_file(Path(path))
    state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.fc.", "fc."))}
    if hasattr(model, "patch_embed"):   # a ViT's classifier is `head.`
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:         # shape mismatches
        raise VlddError(f"weights file {path} does not fit timm '{name}' "
                        f"{kwargs or ''}: {str(exc)[:300]}") from exc
    if missing or unexpected:
        raise VlddError(f"weights file {path} does not fit timm '{name}': missing "
                        f"{missing[:3]}, unexpected {unexpected[:3]}.")
    return model


def _timm_kwargs(spec: dict) -> dict:
    """model.image_encoder.kwargs for timm.create_model, without the arguments vldd sets."""
    kwargs = dict(spec["kwargs"] or {})
    bad = sorted(set(kwargs) & {"pretrained", "num_classes", "model_name"})
    if bad:
        raise VlddError(f"model.image_encoder.kwargs must not set {bad}: vldd sets them "
                        "(weights come from model.image_encoder.weights; features are pooled).")
    return kwargs


def _create_model(timm, name: str, kwargs: dict, **fixed):
    """timm.create_model, with a misspelt or unsupported model.image_encoder.kwargs key
    reported as one error instead of a TypeError deep inside timm."""
    try:
        return timm.create_model(name, **fixed, **kwargs)
    except TypeError as exc:
        raise VlddError(f"model.image_encoder.kwargs {kwargs} do not fit timm '{name}' ({exc}). "
                        "Fix or remove the key (timm's documentation of the model lists "
                        "its arguments).") from exc


def _unfuse_attention(module: nn.Module):
    """Plain (not fused) attention in the trained part: the distillation unroll differentiates
    through gradients (double backward), which PyTorch's fused scaled-dot-product kernels
    (flash / memory-efficient, on CPU and CUDA) do not implement. Same function, more memory."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


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


def to_model_input(images_uint8: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in the encoder's normalised pixel space."""
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
