"""Expert trajectories as inputs of the later stages: were they trained on this data and with
this model, and the model holding an expert's final parameters."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .config import filled, lora_spec, text_spec
from .errors import VlddError
from .io import config_hash, open_h5
from .model import build_model
from .trajectory import Trajectory


def data_fingerprint(data_dir, embeddings_path) -> dict:
    """What a resumed expert must share with the files it resumes from, besides the config."""
    data_dir = Path(data_dir)
    captions = hashlib.sha256((data_dir / "captions.parquet").read_bytes()).hexdigest()
    with open_h5(data_dir / "images.h5", "images") as f:
        images = {"config": f.attrs.get("config_sha256", ""), "shape": list(f["images"].shape)}
    with open_h5(embeddings_path, "embeddings") as f:
        emb = {k: str(f.attrs.get(k, "")) for k in sorted(f.attrs) if k != "git_commit"}
    return {"captions_sha256": captions, "images": images, "embeddings": emb}


def check_experts_data(trajectories, data_dir, embeddings_path):
    """Refuse experts trained on other data (another dataset, captions or text embeddings)."""
    here = config_hash(data_fingerprint(data_dir, embeddings_path))
    for t in trajectories:
        theirs = t.attrs.get("data_sha256")
        if theirs is not None and theirs != here:
            raise VlddError(
                f"{t.path}: this expert was trained on other data than {data_dir} with "
                f"{embeddings_path} (another dataset, caption set or text encoder). Rerun "
                "train_expert for this data, or point the stage at the matching experts.")


def _image_spec_key(spec: dict) -> dict:
    spec = filled("model.image_encoder", spec)
    key = {"name": spec["name"], "weights": spec["weights"], "trainable": spec["trainable"],
           "kwargs": spec["kwargs"] or {}}
    if key["trainable"] == "lora":  # adapters of another alpha or dropout are another model
        key["lora"] = {k: v for k, v in lora_spec(spec["lora"]).items() if k != "seed"}
    return key


# model keys besides the encoders that change what an expert learns
MODEL_KEYS = ("head_dropout", "temperature", "quirk_inner_log_scale")


def check_expert_model(t, model_cfg: dict) -> None:
    """Refuse an expert trajectory `t` trained with another model than `model_cfg`: another
    image encoder (name, weights, trainable part, kwargs, LoRA), text encoder, text-head
    dropout, temperature or logit quirk. (The label model.name does not count.)"""
    theirs_model = json.loads(t.attrs.get("config_json", "{}")).get("model", {})
    checks = [("image_encoder", _image_spec_key), ("text_encoder", text_spec)]
    for key, norm in checks:
        raw = t.attrs.get(key)
        theirs = json.loads(raw) if raw is not None else theirs_model.get(key)
        if theirs is not None and norm(theirs) != norm(model_cfg[key]):
            _other_model(t.path, key, norm(theirs), norm(model_cfg[key]))
    if not theirs_model:
        return
    theirs_model, model_cfg = filled("model", theirs_model), filled("model", model_cfg)
    for key in MODEL_KEYS:
        theirs, ours = theirs_model[key], model_cfg[key]
        if theirs != ours:
            _other_model(t.path, f"model.{key}", theirs, ours)


def _other_model(path, key, theirs, ours):
    raise VlddError(
        f"{path}: this expert was trained with another model ({key} "
        f"{json.dumps(theirs, sort_keys=True)}, the config has "
        f"{json.dumps(ours, sort_keys=True)}). Rerun train_expert with the current config, "
        "or pass the expert of this model.")


def load_expert_model(expert_path, model_cfg, text_dim, data_dir, embeddings_path, device):
    """A model of `model_cfg` holding the final parameters of the expert at expert_path.

    Refuses an expert of another model (image encoder name, weights or trainable part, text
    encoder, or parameter layout) or one trained on other data.
    """
    t = Trajectory(expert_path)
    try:
        check_expert_model(t, model_cfg)
        check_experts_data([t], data_dir, embeddings_path)
        model = build_model(model_cfg, text_dim, seed=0)
        layouts = model.layouts()
        with torch.no_grad():
            for group, module in (("image", model.tail), ("text", model.head)):
                t.check_layout(group, layouts[group])
                params = [p for p in module.parameters() if p.requires_grad]
                torch.nn.utils.vector_to_parameters(t.params(group, t.n_epochs), params)
        attrs = {"expert": str(expert_path), "expert_config_sha256": str(t.attrs.get(
            "config_sha256", "")), "expert_epoch": t.n_epochs}
    finally:
        t.close()
    return model.to(device), attrs


def _check_schedule(cfg, n_epochs, path):
    need = int(cfg.max_start_epoch) - 1 + int(cfg.expert_epochs)
    if need > n_epochs:
        raise VlddError(f"{path}: has {n_epochs} epochs, but distill.max_start_epoch "
                        f"({cfg.max_start_epoch}) - 1 + distill.expert_epochs "
                        f"({cfg.expert_epochs}) = {need}. Train longer experts or lower them.")


def _check_rows(t, last: int):
    """Read every epoch the run can draw (0..last) once, so that a truncated or corrupt
    expert is refused before the first iteration rather than hours into the run."""
    for group in ("image", "text"):
        for epoch in range(last + 1):
            t.rows(group, epoch)


def load_experts(expert_paths, data_dir, embeddings_path, model_cfg, cfg, layouts):
    """The expert trajectories, each checked against this data, model, layout and schedule
    and read through every epoch the run can draw (a truncated file fails now, not later)."""
    if not expert_paths:
        raise VlddError("distill needs at least one expert trajectory (experts.count >= 1).")
    experts = [Trajectory(p) for p in expert_paths]
    check_experts_data(experts, data_dir, embeddings_path)
    for t in experts:
        check_expert_model(t, model_cfg)
        for group in ("image", "text"):
            t.check_layout(group, layouts[group])
        _check_schedule(cfg, t.n_epochs, t.path)
        _check_rows(t, int(cfg.max_start_epoch) - 1 + int(cfg.expert_epochs))
    return experts
