"""The trunk/tail split of a timm image encoder, per family.

`trainable` says which part of the encoder is trained: all, none, last:K or lora. The frozen
trunk runs once per batch of pixels (its output cached for real images), the tail holds the
parameters that are trained, recorded in expert trajectories and unrolled in distillation.
last:K cuts between blocks, which each family stores differently: EfficientNet / MobileNet
(conv_stem, blocks, conv_head), NFNet-style (stem, stages, final_conv) and ViT (blocks of
tokens, whose tail also has to pool as the whole model does).
"""
from __future__ import annotations

import torch.nn as nn

from ..errors import VlddError
from .lora import add_lora

TRAINABLE_HELP = ("all, none, last:K (the last K blocks and the layers after them), lora "
                  "(the whole encoder frozen, LoRA adapters trained) or heads (the whole "
                  "encoder frozen, an image projection head trained)")


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
    """(trunk, tail) of a timm VisionTransformer cut before its last k blocks."""
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


def split_tower(model: nn.Module, trainable: str, lora: dict | None = None, seed: int = 0):
    """(trunk, tail) of a timm model with num_classes=0 for `trainable` all | none | last:K |
    lora | heads. The tail holds the parameters that are trained (requires_grad) and recorded.
    With heads the encoder is the trunk and the tail empty here: vldd.model.build_model puts
    the image projection head there (its width and dropout are the model's)."""
    if trainable == "all":
        return nn.Identity(), model
    if trainable in ("none", "heads"):
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
    elif ({"patch_embed", "blocks", "norm", "fc_norm"} <= names
          and hasattr(model, "forward_features")):
        return _split_vit(model, k)
    else:
        raise VlddError(f"trainable '{trainable}' is supported for EfficientNet/MobileNet, "
                        f"NFNet-style and ViT timm models; {type(model).__name__} takes all, "
                        "none or lora.")
    if not 0 <= k <= len(blocks):
        raise VlddError(f"trainable last:{k}: the model has {len(blocks)} blocks.")
    cut = len(blocks) - k
    return nn.Sequential(*stem, *blocks[:cut]), nn.Sequential(*blocks[cut:], *post)
