"""LoRA on the image encoder (trainable: lora, the TMLR version's LoRA matching).

The whole pretrained encoder stays frozen and peft LoRA adapters are trained: every adapted
layer computes base(x) + (alpha / rank) * B(A(dropout(x))). Besides the spec and peft's
injection, this holds the defaults of which layers to adapt per timm family and the repair
of the adapters peft builds for weight-standardised convolutions (NFNets).
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn

from ..config import lora_spec
from ..errors import VlddError

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
    """Whether a parameter (by its full name) is an adapter's A or B: what trains with lora."""
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
