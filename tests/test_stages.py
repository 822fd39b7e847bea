"""Stage functions on a tiny prepared dataset, without Snakemake."""
from __future__ import annotations

from vldd.checkpoint import load_distiller, save_distiller  # noqa: F401
import copy

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from vldd.stages.select_coreset import select_coreset
from vldd.stages.prepare_dataset import prepare_dataset
from vldd.stages.distill import distill
from vldd.stages.embed_captions import embed_captions
from vldd.prepared import load_embeddings
from vldd.encoders import build_text_encoder, embed_texts
from vldd.errors import VlddError
from vldd.stages.evaluate import evaluate
from vldd.stages.train_expert import train_expert
from vldd.pairset import read_pairset
from vldd.trajectory import Trajectory

from conftest import DATASET, DISTILL, EVAL, EXPERTS, MODEL  # the `store` fixture: conftest


def test_expert_trajectory_has_every_epoch_and_moves(store):
    t = Trajectory(store / "expert_0.h5")
    assert t.n_epochs == 3
    rows = [t.params("text", e) for e in range(4)]
    assert all(not torch.equal(rows[e], rows[e + 1]) for e in range(3))
    # Row 0 of the image group is the pretrained tail, untouched by training (up to the
    # shipped default storage, bfloat16 offsets from the start).
    from vldd.model import build_model
    fresh = build_model(MODEL, 384, seed=0)
    flat = torch.cat([p.detach().reshape(-1) for p in fresh.tail.parameters()])
    assert torch.allclose(t.params("image", 0), flat, rtol=2 ** -8, atol=1e-6)
    assert not torch.equal(t.params("image", 3), flat)
    with h5py.File(store / "expert_0.h5") as f:
        assert np.isfinite(f["metrics/loss"][()]).all()
        val = f["metrics/val"][()]
        assert val.shape == (3, 6) and np.isfinite(val).all() and (val >= 0).all()
    t.close()


def test_distinct_captions_are_embedded_once_and_in_order():
    tower = build_text_encoder(MODEL["text_encoder"])
    texts = ["a red star", "two blue rings", "a red star", "a red star", "two blue rings"]
    emb = embed_texts(tower, texts, batch_size=2)
    assert np.array_equal(emb[0], emb[2]) and np.array_equal(emb[1], emb[4])
    assert not np.allclose(emb[0], emb[1])
    assert np.allclose(emb[1], embed_texts(tower, ["two blue rings"])[0], atol=1e-5)


def test_embedding_cache_refuses_changed_captions_and_another_encoder(store, tmp_path):
    assert load_embeddings(store / "emb.h5", store / "data", MODEL["text_encoder"]).shape[1] == 384
    other = copy.deepcopy(DATASET)
    other["synthetic"]["seed"] = 4
    prepare_dataset(other, tmp_path / "data")
    with pytest.raises(VlddError, match="another captions file"):
        load_embeddings(store / "emb.h5", tmp_path / "data")
    with pytest.raises(VlddError, match="another text encoder"):
        load_embeddings(store / "emb.h5", store / "data",
                        {**MODEL["text_encoder"], "pooling": "cls"})


def test_budget_larger_than_the_training_set_is_rejected_without_output(store, tmp_path):
    out = tmp_path / "pairs.h5"
    with pytest.raises(VlddError, match="larger than the training set"):
        select_coreset(store / "data", store / "emb.h5", MODEL, "random", 25, 0, out)
    assert not list(tmp_path.iterdir())


def test_random_coreset_is_real_training_pairs(store, tmp_path):
    select_coreset(store / "data", store / "emb.h5", MODEL, "random", 5, 0, tmp_path / "c.h5")
    ps = read_pairset(tmp_path / "c.h5")
    caps = pd.read_parquet(store / "data/captions.parquet").set_index("caption_id")
    assert ps.budget == 5 and set(caps.loc[ps.caption_ids, "split"]) == {"train"}
    assert len(set(caps.loc[ps.caption_ids, "image_index"])) == 5  # distinct images
    emb = load_embeddings(store / "emb.h5", store / "data")
    assert np.array_equal(ps.texts, emb[ps.caption_ids])
    assert np.isnan(ps.lr_image)


def _distill(store, out, **over):
    cfg = {**DISTILL, **over}
    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, cfg, 6,
            out / "pairs.h5", out / "curve.parquet", device="cpu")


def test_distill_resumes_from_its_checkpoint_to_identical_bytes(store, tmp_path):
    from vldd.stages.distill import Distiller
    from vldd.stages.distill import checkpoint_key

    _distill(store, tmp_path / "straight")
    # An interrupted run: 2 iterations and a checkpoint, then the stage is started again.
    part = tmp_path / "resumed"
    d = Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, DISTILL, 6,
                  "cpu")
    d.iterate()
    d.iterate()
    part.mkdir()
    save_distiller(d, part / "pairs.h5.ckpt.h5",
                      checkpoint_key(MODEL, DISTILL, 6, [store / "expert_0.h5"]))
    _distill(store, part)
    assert not (part / "pairs.h5.ckpt.h5").exists()
    curve = pd.read_parquet(part / "curve.parquet")
    assert list(curve["iteration"]) == [0, 1, 2, 3]
    for name in ("pairs.h5", "curve.parquet"):
        assert (part / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name


def test_distillation_changes_the_data_and_evaluation_uses_learned_lrs(store, tmp_path):
    _distill(store, tmp_path)
    ps = read_pairset(tmp_path / "pairs.h5")
    assert ps.kind == "distilled" and ps.budget == 6
    assert not np.array_equal(ps.texts, ps.init_texts)
    assert not np.array_equal(ps.images, ps.init_images)
    assert ps.lr_text >= DISTILL["lr_min"] and ps.lr_image >= DISTILL["lr_min"]
    evaluate(store / "data", store / "emb.h5", tmp_path / "pairs.h5", MODEL, EVAL, 0,
             tmp_path / "ev.parquet", dataset="t", device="cpu")
    ev = pd.read_parquet(tmp_path / "ev.parquet")
    assert set(ev["metric"]) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}
    assert ev["value"].between(0, 100).all()
    assert np.isclose(ev["lr_image"].iloc[0], ps.lr_image)
    assert np.isclose(ev["lr_text"].iloc[0], ps.lr_text)


def test_text_only_distillation_leaves_images_bit_identical(store, tmp_path):
    _distill(store, tmp_path, learn_images=False)
    ps = read_pairset(tmp_path / "pairs.h5")
    assert np.array_equal(ps.images, ps.init_images)
    assert not np.array_equal(ps.texts, ps.init_texts)


def test_diverging_distillation_stops_with_iteration_and_advice(store, tmp_path):
    with pytest.raises(VlddError, match=r"diverged at iteration \d+.*lr_image"):
        _distill(store, tmp_path, lr_init=1e6, lr_min=None)
    assert not (tmp_path / "pairs.h5").exists()


def test_expert_schedule_longer_than_the_expert_is_rejected(store, tmp_path):
    with pytest.raises(VlddError, match="max_start_epoch"):
        _distill(store, tmp_path, max_start_epoch=3, expert_epochs=2)


def test_inspect_prints_provenance_and_shapes_of_each_artifact(store, tmp_path, capsys):
    from vldd.cli import main
    from vldd.stages.summarize import summarize
    _distill(store, tmp_path)
    evaluate(store / "data", store / "emb.h5", tmp_path / "pairs.h5", MODEL, EVAL, 0,
             tmp_path / "ev.parquet", dataset="t", device="cpu")
    summarize([tmp_path / "ev.parquet"], tmp_path / "table.parquet", tmp_path / "table.md")
    files = [store / "data/images.h5", store / "data/captions.parquet", store / "emb.h5",
             store / "expert_0.h5", tmp_path / "pairs.h5", tmp_path / "curve.parquet",
             tmp_path / "ev.parquet", tmp_path / "table.parquet"]
    assert main(["inspect", *map(str, files)]) == 0
    out = capsys.readouterr().out
    for schema in ("images", "captions", "embeddings", "trajectory", "pairset", "eval", "table"):
        assert f"schema = vldd/{schema}" in out
    assert out.count("schema_version = 1") == len(files)
    assert out.count("vldd_version = ") == len(files)
    assert "image_encoder = " in out and "text_encoder = " in out and "seed = 0" in out
    assert "data_sha256 = " in out  # the expert names the data it was trained on
    # 3 epochs + the initial row, stored as the shipped default (bfloat16 bits in uint16)
    assert "/image/params: uint16 [4, " in out
    assert "parquet: 4 rows" in out  # the curve of 4 iterations
    assert out.count("config_sha256 = ") == len(files)
    broken = tmp_path / "broken.h5"
    broken.write_bytes((store / "expert_0.h5").read_bytes()[:1000])
    assert main(["inspect", str(broken)]) == 2


def test_sigkilled_distill_resumes_to_the_same_bytes_as_an_uninterrupted_run(store, tmp_path):
    import json
    import signal
    import subprocess
    import sys
    import time

    cfg = json.dumps({"model": MODEL, "distill": {**DISTILL, "iterations": 30}})

    def start(out):
        out.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "vldd", "--threads", "1", "distill", "--config-json", cfg,
               "--data", str(store / "data"), "--embeddings", str(store / "emb.h5"),
               "--experts", str(store / "expert_0.h5"), "--budget", "6",
               "--out", str(out / "pairs.h5"), "--curve", str(out / "curve.parquet"),
               "--device", "cpu"]
        return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    straight = tmp_path / "straight"
    assert start(straight).wait(timeout=300) == 0
    killed = tmp_path / "killed"
    proc = start(killed)
    ckpt = killed / "pairs.h5.ckpt.h5"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "distill finished before it could be killed"
    assert ckpt.exists()
    assert not (killed / "pairs.h5").exists() and not (killed / "curve.parquet").exists()
    assert start(killed).wait(timeout=300) == 0
    for name in ("pairs.h5", "curve.parquet"):
        assert (killed / name).read_bytes() == (straight / name).read_bytes(), name
    assert not ckpt.exists()


def _expert_cmd(store, out, epochs):
    import json
    import sys
    cfg = json.dumps({"model": MODEL, "experts": {**EXPERTS, "epochs": epochs}})
    return [sys.executable, "-m", "vldd", "--threads", "1", "train-expert", "--config-json", cfg,
            "--data", str(store / "data"), "--embeddings", str(store / "emb.h5"),
            "--index", "0", "--out", str(out), "--device", "cpu"]


def test_sigkilled_expert_resumes_from_its_last_epoch_to_the_same_bytes(store, tmp_path):
    import signal
    import subprocess
    import time

    epochs = 12
    straight = tmp_path / "straight.h5"
    assert subprocess.run(_expert_cmd(store, straight, epochs), capture_output=True,
                          timeout=300).returncode == 0
    killed = tmp_path / "killed.h5"
    ckpt = tmp_path / "killed.h5.ckpt"
    proc = subprocess.Popen(_expert_cmd(store, killed, epochs), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (ckpt / "epoch_0002.h5").exists() and proc.poll() is None \
            and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "the expert finished before it could be killed"
    finished = sorted(p.name for p in ckpt.glob("epoch_*.h5"))
    assert 3 <= len(finished) < epochs + 1, finished
    assert not killed.exists()  # nothing that looks finished
    resumed = subprocess.run(_expert_cmd(store, killed, epochs), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from epoch" in resumed.stderr
    assert killed.read_bytes() == straight.read_bytes()
    assert not ckpt.exists()


def test_expert_epoch_files_of_another_config_are_not_resumed(store, tmp_path, monkeypatch):
    import vldd.checkpoint

    out = tmp_path / "e.h5"
    train_expert(store / "data", store / "emb.h5", MODEL, {**EXPERTS, "epochs": 2}, 0, out,
                 device="cpu")
    reference = out.read_bytes()
    out.unlink()
    # The epoch files of a run with another text lr, left behind as a killed run leaves them.
    with monkeypatch.context() as m:
        m.setattr(vldd.checkpoint.shutil, "rmtree", lambda path: None)
        train_expert(store / "data", store / "emb.h5", MODEL,
                     {**EXPERTS, "epochs": 2, "lr_text": 0.5}, 0, tmp_path / "x.h5", device="cpu")
    (tmp_path / "x.h5.ckpt").rename(tmp_path / "e.h5.ckpt")
    train_expert(store / "data", store / "emb.h5", MODEL, {**EXPERTS, "epochs": 2}, 0, out,
                 device="cpu")
    assert out.read_bytes() == reference
    assert not (tmp_path / "e.h5.ckpt").exists()


def test_every_stage_writes_the_same_bytes_when_run_twice(store, tmp_path):
    """Same config and seed, same bytes: no timestamps in HDF5 objects, sorted metadata."""
    from vldd.stages.evaluate import train_full
    from vldd.stages.summarize import summarize

    def twice(run, *outputs):
        run()
        first = {p: p.read_bytes() for p in outputs}
        for p in outputs:
            p.unlink()
        run()
        for p in outputs:
            assert p.read_bytes() == first[p], f"{p.name} differs between two runs"

    d = tmp_path
    data = d / "data"
    twice(lambda: prepare_dataset(DATASET, data), data / "images.h5", data / "captions.parquet")
    twice(lambda: embed_captions(data, MODEL["text_encoder"], d / "emb.h5", device="cpu"),
          d / "emb.h5")
    twice(lambda: train_expert(data, d / "emb.h5", MODEL, {**EXPERTS, "epochs": 2}, 0,
                               d / "expert.h5", device="cpu"), d / "expert.h5")
    twice(lambda: distill(data, d / "emb.h5", [d / "expert.h5"], MODEL, DISTILL, 6,
                          d / "pairs.h5", d / "curve.parquet", device="cpu"),
          d / "pairs.h5", d / "curve.parquet")
    twice(lambda: select_coreset(data, d / "emb.h5", MODEL, "random", 6, 0, d / "core.h5"),
          d / "core.h5")
    twice(lambda: evaluate(data, d / "emb.h5", d / "pairs.h5", MODEL, EVAL, 0, d / "ev.parquet",
                           dataset="t", device="cpu"), d / "ev.parquet")
    twice(lambda: train_full(data, d / "emb.h5", MODEL, {**EXPERTS, "epochs": 1}, 0,
                             d / "full.parquet", dataset="t", device="cpu"), d / "full.parquet")
    twice(lambda: summarize([d / "ev.parquet", d / "full.parquet"], d / "t.parquet", d / "t.md"),
          d / "t.parquet", d / "t.md")


def test_best_test_checkpoint_quirk_reports_the_best_tested_epoch(store, tmp_path):
    from vldd.stages.evaluate import r_mean

    _distill(store, tmp_path)

    def run(epochs, **quirk):
        out = tmp_path / f"ev{epochs}{len(quirk)}.parquet"
        evaluate(store / "data", store / "emb.h5", tmp_path / "pairs.h5", MODEL,
                 {**EVAL, "epochs": epochs, **quirk}, 0, out, dataset="t", device="cpu")
        return pd.read_parquet(out)

    # Training for k epochs is a prefix of training for 4 (same seed): the test metrics
    # after each epoch, measured by separate runs without the quirk.
    per_epoch = {k: run(k) for k in range(5)}
    assert all(set(df["epoch"]) == {k} for k, df in per_epoch.items())
    means = {k: r_mean(dict(zip(df["metric"], df["value"]))) for k, df in per_epoch.items()}
    best = run(4, quirk_best_test_checkpoint=True, quirk_test_every=1)
    expected = max(means, key=lambda k: (means[k], -k))  # the best, the earliest on ties
    assert int(best["epoch"].iloc[0]) == expected, means
    assert np.array_equal(best["value"], per_epoch[expected]["value"])
    every2 = run(4, quirk_best_test_checkpoint=True, quirk_test_every=2)
    assert int(every2["epoch"].iloc[0]) == max((0, 2, 4), key=lambda k: (means[k], -k))


def test_cross_architecture_evaluation_renormalises_the_pixels(store, tmp_path):
    from vldd.stages.evaluate import renormalise
    from vldd.model import build_model

    _distill(store, tmp_path)
    ps = read_pairset(tmp_path / "pairs.h5")
    other = {**MODEL, "name": "t@resnet18",
             "image_encoder": {"name": "resnet18", "weights": "none", "trainable": "all"}}
    tower = build_model(other, ps.texts.shape[1], 0).tower
    assert not np.allclose(tower.mean, ps.mean)  # the two encoders normalise differently
    moved = renormalise(ps.images, ps.mean, ps.std, tower.mean, tower.std)
    # the same raw pixels, in the other encoder's normalisation
    raw = ps.images * np.asarray(ps.std)[None, :, None, None] + np.asarray(ps.mean)[None, :, None, None]
    again = moved * np.asarray(tower.std)[None, :, None, None] + np.asarray(tower.mean)[None, :, None, None]
    assert np.allclose(raw, again, atol=1e-5) and not np.allclose(moved, ps.images)
    assert renormalise(ps.images, ps.mean, ps.std, ps.mean, ps.std) is ps.images
    evaluate(store / "data", store / "emb.h5", tmp_path / "pairs.h5", other, EVAL, 0,
             tmp_path / "cross.parquet", dataset="t", device="cpu")
    ev = pd.read_parquet(tmp_path / "cross.parquet")
    assert set(ev["model"]) == {"t@resnet18"} and ev["value"].between(0, 100).all()


def test_image_only_distillation_leaves_texts_bit_identical(store, tmp_path):
    _distill(store, tmp_path, learn_texts=False)
    ps = read_pairset(tmp_path / "pairs.h5")
    assert np.array_equal(ps.texts, ps.init_texts)
    assert not np.array_equal(ps.images, ps.init_images)


@pytest.mark.parametrize("init", [{"image": "noise", "text": "real"},
                                  {"image": "real", "text": "noise"}])
def test_initialisation_per_modality(store, tmp_path, init):
    _distill(store, tmp_path, init=init, iterations=1)
    ps = read_pairset(tmp_path / "pairs.h5")
    _distill(store, tmp_path / "real", iterations=1)
    real = read_pairset(tmp_path / "real" / "pairs.h5")
    emb = load_embeddings(store / "emb.h5", store / "data")
    # the modality initialised from real pairs starts at the same real pairs as the default
    if init["text"] == "real":
        assert np.array_equal(ps.init_texts, real.init_texts)
        assert np.array_equal(ps.init_texts, emb[real.caption_ids])
        assert not np.allclose(ps.init_images, real.init_images)
        assert (ps.caption_ids == -1).all()  # no real pair behind a noise image
    else:
        assert np.array_equal(ps.init_images, real.init_images)
        assert not np.allclose(ps.init_texts, real.init_texts)
        # noise texts keep the scale of the real embeddings
        assert 0.5 < ps.init_texts.std() / real.init_texts.std() < 2.0


@pytest.mark.parametrize("offsets", [False, True])
def test_expert_stored_in_bfloat16_with_gzip_is_smaller_and_close(store, tmp_path, offsets):
    out, ref = tmp_path / "e16.h5", tmp_path / "e32.h5"
    train_expert(store / "data", store / "emb.h5", MODEL,
                 {**EXPERTS, "storage": {"dtype": "bfloat16", "compression": "gzip",
                                         "offsets": offsets}}, 0, out, device="cpu")
    train_expert(store / "data", store / "emb.h5", MODEL,
                 {**EXPERTS, "storage": {"dtype": "float32", "compression": "none",
                                         "offsets": False}}, 0, ref, device="cpu")
    full, small = Trajectory(ref), Trajectory(out)
    assert out.stat().st_size < 0.6 * ref.stat().st_size
    for g in ("image", "text"):
        for e in range(full.n_epochs + 1):
            a, b = full.params(g, e), small.params(g, e)
            # the same training (float32), only the stored rows are rounded (offsets: relative
            # to the offset from epoch 0, at most |a| + |a_0|)
            scale = a.abs() + (full.params(g, 0).abs() if offsets else 0)
            assert ((a - b).abs() <= scale / 128 + 1e-6).all(), (g, e)
        if offsets:  # the epoch differences that the matching loss uses keep bf16 precision
            for e in range(full.n_epochs):
                true = full.params(g, e + 1) - full.params(g, e)
                got = small.params(g, e + 1) - small.params(g, e)
                assert ((got - true).norm() / true.norm()).item() < 2 ** -6, (g, e)
    full.close()
    small.close()


def test_without_a_trunk_real_images_stay_uint8_and_batches_equal_the_eager_features(store):
    """trainable: all (or lora) has no frozen trunk to precompute: RealData keeps the split's
    uint8 images and normalises each indexed batch, giving the very tensors that the eager
    float copy of the whole split would (which for Flickr30K at 224 px is 17.5 GB)."""
    from vldd.prepared import load_prepared
    from vldd.realdata import RealData, train_on_real
    from vldd.model import PixelBatches, build_model, trunk_features

    prepared = load_prepared(store / "data")
    emb = load_embeddings(store / "emb.h5", store / "data", MODEL["text_encoder"])
    cfg = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "trainable": "all"}}
    model = build_model(cfg, emb.shape[1], seed=0)
    data = RealData(prepared, emb, model, "train", "cpu")
    assert isinstance(data.feats, PixelBatches) and data.feats.images.dtype == np.uint8
    eager = trunk_features(model.tower, prepared.images[data.image_ids], "cpu")
    idx = torch.tensor([5, 0, 17, 5, 3])
    assert torch.equal(data.feats[idx], eager[idx])
    assert torch.equal(data.feats[2:9], eager[2:9]) and len(data.feats) == len(eager)
    # the same training and retrieval as on the eager features, to the bit
    twin = build_model(cfg, emb.shape[1], seed=0)
    run = dict(EXPERTS, epochs=1)
    train_on_real(model, data, cfg, run, seed=0)
    data.feats = eager
    train_on_real(twin, data, cfg, run, seed=0)
    for a, b in zip(model.tail.parameters(), twin.tail.parameters()):
        assert torch.equal(a, b)
    # a model with a frozen trunk still precomputes its features once
    assert torch.is_tensor(RealData(prepared, emb, build_model(MODEL, emb.shape[1], 0), "test",
                                    "cpu").feats)
