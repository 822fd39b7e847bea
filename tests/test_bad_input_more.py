"""More bad input through the command line (issue 10): the 24 situations it lists, and more.

Each case asserts one error line that names the file or key and the fix, exit status 2 and
no output left behind; or, where the input is legitimate, the correct result.
"""
from __future__ import annotations

from vldd.checkpoint import load_distiller, save_distiller  # noqa: F401
import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from conftest import DATASET, DISTILL, EVAL, EXPERTS, MODEL
from test_bad_input import assert_refused, karpathy, no_outputs, vldd  # noqa: F401

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ helpers

@pytest.fixture(scope="module")
def coreset(store, tmp_path_factory):
    """A random coreset of 6 pairs of the store (a real pair set to alter)."""
    from vldd.stages.select_coreset import select_coreset
    path = tmp_path_factory.mktemp("coreset") / "pairs.h5"
    select_coreset(store / "data", store / "emb.h5", MODEL, "random", 6, 0, path)
    return path


def altered(src, dst, **attrs):
    """A copy of HDF5 file `src` with root attributes replaced."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
    return dst


def evaluate(store, pairs, out, model=MODEL, ev=EVAL, data=None, emb=None):
    return vldd("evaluate", "--data", data or store / "data",
                "--embeddings", emb or store / "emb.h5", "--pairs", pairs, "--seed", 0,
                "--out", out, config={"model": model, "evaluate": ev})


def distill(store, tmp_path, experts=None, cfg=DISTILL, model=MODEL, budget=6):
    return vldd("distill", "--data", store / "data", "--embeddings", store / "emb.h5",
                "--experts", *(experts or [store / "expert_0.h5"]), "--budget", budget,
                "--out", tmp_path / "d" / "pairs.h5", "--curve", tmp_path / "d" / "curve.parquet",
                config={"model": model, "distill": cfg})


def train_expert(store, out, model=MODEL, experts=EXPERTS, data=None, emb=None):
    return vldd("train-expert", "--data", data or store / "data",
                "--embeddings", emb or store / "emb.h5", "--index", 0, "--out", out,
                config={"model": model, "experts": experts})


def prepare(cfg, tmp_path):
    return vldd("prepare-dataset", "--out-dir", tmp_path / "out", config=cfg)


def edit_annotations(ann, change):
    d = json.loads(ann.read_text())
    change(d["images"])
    ann.write_text(json.dumps(d))


# ------------------------------------------------------------------ 1. negative learned lrs

def test_negative_lr_min_is_refused(store, tmp_path):
    out = distill(store, tmp_path, cfg={**DISTILL, "lr_min": -5})
    assert_refused(out, "distill.lr_min", "-5")
    assert no_outputs(tmp_path / "d")


def test_distill_refuses_to_save_lrs_at_or_below_zero(store, tmp_path):
    """lr_min null lets the lrs go negative; a finished run with such lrs saves nothing."""
    from vldd.stages.distill import Distiller, checkpoint_key

    experts = [store / "expert_0.h5"]
    cfg = {**DISTILL, "lr_min": None, "iterations": 1}
    d = Distiller(store / "data", store / "emb.h5", experts, MODEL, cfg, 6, "cpu")
    d.iterate()
    for p in d.lr_params:
        p.data.fill_(-0.02)
    ckpt = tmp_path / "d" / "pairs.h5.ckpt.h5"
    ckpt.parent.mkdir()
    save_distiller(d, ckpt, checkpoint_key(MODEL, cfg, 6, experts))
    out = distill(store, tmp_path, cfg=cfg)
    assert_refused(out, "lr_image -0.02", "gradient ascent", "distill.lr_min")
    assert not (tmp_path / "d" / "pairs.h5").exists()
    assert ckpt.exists()                       # the finished work is not lost


@pytest.mark.parametrize("lr", [-0.05, 0.0, float("inf")])
def test_evaluate_refuses_learned_lrs_that_are_not_finite_positive(store, coreset, tmp_path, lr):
    pairs = altered(coreset, tmp_path / "p.h5", kind="distilled", lr_image=lr, lr_text=0.05)
    out = evaluate(store, pairs, tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "p.h5", "not finite and positive", "use_learned_lr")
    assert no_outputs(tmp_path / "e")


# ------------------------------------------------------------------ 2. another model / data

@pytest.mark.parametrize("change", [
    {"temperature": 0.05},
    {"head_dropout": 0.3},
    {"image_encoder": {**MODEL["image_encoder"], "weights": "none"}},
], ids=["temperature", "dropout", "weights"])
def test_distill_refuses_an_expert_of_another_model_config(store, tmp_path, change):
    out = distill(store, tmp_path, model={**MODEL, **change})
    key = next(iter(change))
    assert_refused(out, "expert_0.h5", "another model", key, "train_expert")
    assert no_outputs(tmp_path / "d")


def test_expert_model_label_alone_does_not_count(store, tmp_path):
    """model.name is a label: an expert is usable under another one (a correct result)."""
    out = distill(store, tmp_path, model={**MODEL, "name": "renamed"},
                  cfg={**DISTILL, "iterations": 1})
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "d" / "pairs.h5").exists()


def test_evaluate_refuses_a_pair_set_of_other_data(store, coreset, tmp_path):
    with h5py.File(coreset) as f:
        assert len(f.attrs["data_sha256"]) == 64      # pair sets carry the fingerprint
    pairs = altered(coreset, tmp_path / "p.h5", data_sha256="0" * 64)
    out = evaluate(store, pairs, tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "p.h5", "other data", "Evaluate it on the data it was made from")
    assert no_outputs(tmp_path / "e")


# ------------------------------------------------------------------ 3, 7. the schema

SCHEMA_CASES = {
    "seeds": ({"evaluate": {"seeds": [0, 0]}}, "evaluate.seeds"),
    "budgets": ({"distill": {"budgets": [8, 8]}}, "distill.budgets"),
    "lr_min": ({"distill": {"lr_min": -5}}, "distill.lr_min"),
    "nan": ({"experts": {"lr_image": float("nan")}}, "experts.lr_image"),
    "inf": ({"model": {"temperature": float("inf")}}, "model.temperature"),
    "dotdot": ({"dataset": {"name": ".."}}, "dataset.name"),
    "newline": ({"dataset": {"name": "tiny\n"}}, "dataset.name"),
    "resolution": ({"dataset": {"resolution": 20000}}, "dataset.resolution"),
    "n_train": ({"dataset": {"synthetic": {"n_train": 1}}}, "dataset.synthetic.n_train"),
    "syn_steps": ({"distill": {"syn_steps": -3}}, "distill.syn_steps"),
    "epochs0": ({"evaluate": {"epochs": 0}}, "evaluate.epochs"),
    "typo": ({"distill": {"init": {"imgae": "noise"}}}, "imgae"),
    "kinds": ({"coresets": {"kinds": ["random", "random"]}}, "coresets.kinds"),
}


def _merge(a, b):
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def dry_run(tmp_path, cfg):
    """`snakemake -n` of the workflow on config `cfg`, run in tmp_path."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile",
                           str(REPO / "Snakefile"), "--configfile", str(tmp_path / "c.yaml"),
                           "-n", "--cores", "1"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("group", [[c for c in SCHEMA_CASES if c != "newline"], ["newline"]],
                         ids=["all-but-newline", "newline"])
def test_schema_refuses_through_snakemake(tmp_path, group):
    """Snakemake reports every violation at once: one dry run per group of cases (the two
    dataset.name cases cannot share a config)."""
    cfg = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    for case in group:
        cfg = _merge(cfg, SCHEMA_CASES[case][0])
    out = dry_run(tmp_path, cfg)
    assert out.returncode != 0
    for case in group:
        assert SCHEMA_CASES[case][1] in out.stdout + out.stderr, case
    assert not (tmp_path / "results").exists()


def test_nan_in_a_distill_variant_is_refused(tmp_path):
    """Variants are checked key by key against the distill schema: each key's schema must
    stand alone (no $ref), and NaN must fail it."""
    cfg = _merge(yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text()),
                 {"distill": {"variants": {"fast": {"lr_image": 0.5, "lr_min": float("nan")}}}})
    out = dry_run(tmp_path, cfg)
    assert out.returncode != 0
    assert "distill.variants.fast.lr_min: nan" in out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr


@pytest.mark.parametrize("case", sorted(SCHEMA_CASES))
def test_schema_refuses_through_the_stage_cli(tmp_path, case):
    """The same settings given to a stage directly (--config-json)."""
    change, key = SCHEMA_CASES[case]
    cfg = {**change, "dataset": _merge(DATASET, change.get("dataset", {}))}
    out = prepare(cfg, tmp_path)
    assert_refused(out, key, "config/README.md")
    assert no_outputs(tmp_path / "out")


# ------------------------------------------------------------------ 4. leakage, duplicates

def test_train_test_leakage_names_both_entries(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    edit_annotations(ann, lambda imgs: imgs[5].update(filename="1.png"))  # a train image
    assert_refused(prepare(cfg, tmp_path), "1.png", "train and the test split",
                   "images[1]", "images[5]")
    assert no_outputs(tmp_path / "out")


def test_duplicate_image_in_one_split(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    edit_annotations(ann, lambda imgs: imgs[2].update(filename="0.png"))
    assert_refused(prepare(cfg, tmp_path), "0.png", "twice in the train split",
                   "images[0]", "images[2]")
    assert no_outputs(tmp_path / "out")


# ------------------------------------------------------------------ 5. tables.include

def test_summarize_refuses_a_parquet_that_is_not_an_evaluation(store, tmp_path):
    curve = tmp_path / "curve.parquet"
    pd.DataFrame({"iteration": [0, 1], "matching_loss": [1.0, 0.9]}).to_parquet(curve)
    out = vldd("summarize", "--inputs", curve, "--out-parquet", tmp_path / "t" / "r.parquet",
               "--out-md", tmp_path / "t" / "r.md", config={})
    assert_refused(out, "curve.parquet", "not an evaluation table", "tables.include")
    assert no_outputs(tmp_path / "t")
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"\x89HDF\r\n\x1a\n not a Parquet file")
    out = vldd("summarize", "--inputs", pairs, "--out-parquet", tmp_path / "t" / "r.parquet",
               "--out-md", tmp_path / "t" / "r.md", config={})
    assert_refused(out, "pairs.parquet", "not a readable Parquet file")
    assert no_outputs(tmp_path / "t")


def test_summarize_refuses_an_evaluation_read_twice(tiny_run, tmp_path):
    """An included earlier run that repeats one of this run's evaluations (or the same run
    included twice) would count that evaluation twice in the mean and the std."""
    evals = sorted((tiny_run / "results").glob("*/eval/**/seed*.parquet"))
    assert len(evals) >= 4
    again = tmp_path / "earlier" / "seed0.parquet"
    again.parent.mkdir()
    shutil.copy(evals[0], again)
    out_dir = tmp_path / "t"
    args = ("--out-parquet", out_dir / "r.parquet", "--out-md", out_dir / "r.md")
    out = vldd("summarize", "--inputs", *evals, again, *args, config={})
    assert_refused(out, str(evals[0]), str(again), "is in 2 files", "tables.include")
    assert no_outputs(out_dir)
    # each evaluation once: the table holds every seed of every method, counted once
    out = vldd("summarize", "--inputs", *evals, *args, config={})
    assert out.returncode == 0, out.stderr[-3000:]
    table = pd.read_parquet(out_dir / "r.parquet")
    assert len(table) == sum(len(pd.read_parquet(p)) for p in evals)


# ------------------------------------------------------------------ 6. image modes

def _one_image_dataset(tmp_path, image: Image.Image, ext="png"):
    root = tmp_path / "raw"
    root.mkdir()
    entries = []
    for i, split in enumerate(["train", "train", "test"]):
        name = f"{i}.{ext}"
        (image if i == 0 else Image.new("RGB", (8, 8), (9, 9, 9))).save(root / name)
        entries.append({"filename": name, "split": split,
                        "sentences": [{"raw": f"picture number {i}"}]})
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": entries}))
    cfg = {**DATASET, "source": "karpathy", "resolution": 8,
           "karpathy": {"annotations": str(ann), "image_root": str(root)}}
    out = prepare({"dataset": cfg}, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    with h5py.File(tmp_path / "out" / "images.h5") as f:
        return f["images"][0]


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    im = Image.fromarray(np.full((8, 8), 32768, np.uint16))
    assert im.mode.startswith("I")
    assert np.abs(_one_image_dataset(tmp_path, im).astype(int) - 128).max() <= 1


def test_transparent_pixels_become_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))   # fully transparent black
    assert (_one_image_dataset(tmp_path, im) == 255).all()


def test_palette_and_cmyk_images_are_converted(tmp_path):
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))   # red
    (tmp_path / "a").mkdir()
    px = _one_image_dataset(tmp_path / "a", cmyk, ext="jpg")
    assert px[..., 0].min() > 200 and px[..., 1:].max() < 50
    pal = Image.new("RGB", (8, 8), (0, 0, 200)).convert("P")
    (tmp_path / "b").mkdir()
    px = _one_image_dataset(tmp_path / "b", pal)
    assert px[..., 2].min() > 150 and px[..., :2].max() < 50


# ------------------------------------------------------------------ 8, 10. caption text

@pytest.mark.parametrize("raw", ["\u200b\u200c\u2060", "\x01\x02\x7f", " \u00a0\u2028 "],
                         ids=["zero-width", "control", "separators"])
def test_invisible_caption_is_empty(karpathy, tmp_path, raw):  # noqa: F811
    cfg, ann, _ = karpathy
    edit_annotations(ann, lambda imgs: imgs[3]["sentences"][1].update(raw=raw))
    assert_refused(prepare(cfg, tmp_path), "images[3]", "caption 1 is empty")
    assert no_outputs(tmp_path / "out")


def test_lone_surrogate_in_a_caption(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    text = ann.read_text().replace("block 2", "block \\ud800 2")
    ann.write_text(text)
    assert_refused(prepare(cfg, tmp_path), "images[2]", "lone surrogate", "raw")
    assert no_outputs(tmp_path / "out")


def test_all_captions_identical(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy

    def same(imgs):
        for entry in imgs:
            entry["sentences"] = [{"raw": "A photo."}]
    edit_annotations(ann, same)
    assert_refused(prepare(cfg, tmp_path), "dataset_x.json", "identical", "captions")
    assert no_outputs(tmp_path / "out")


def test_entry_without_sentences(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    edit_annotations(ann, lambda imgs: imgs[1].update(sentences=[]))
    assert_refused(prepare(cfg, tmp_path), "images[1]", "no captions")
    assert no_outputs(tmp_path / "out")


# ------------------------------------------------------------------ 9. diagnoses

def test_flipped_exponent_bits_in_an_expert_are_called_corruption(store, tmp_path):
    bad = tmp_path / "expert_bad.h5"
    shutil.copy(store / "expert_0.h5", bad)
    with h5py.File(bad, "r+") as f:
        row = f["text/params"][1]
        if row.dtype == np.uint16:        # bfloat16 bits: the top exponent bit set
            row[7] |= 0x4000
        else:
            row.view(np.uint32 if row.dtype == np.float32 else np.uint16)[7] |= (
                0x40000000 if row.dtype == np.float32 else 0x4000)
        f["text/params"][1] = row
    out = distill(store, tmp_path, experts=[bad])
    assert_refused(out, "expert_bad.h5", "corrupt expert file", "rerun train_expert")
    assert "diverged" not in out.stderr
    assert no_outputs(tmp_path / "d")


def test_one_training_image_is_too_few(tmp_path):
    from vldd.stages.prepare_dataset import prepare_dataset
    from vldd.stages.embed_captions import embed_captions

    prepare_dataset({**DATASET, "synthetic": {**DATASET["synthetic"], "n_train": 1}},
                    tmp_path / "data")
    embed_captions(tmp_path / "data", MODEL["text_encoder"], tmp_path / "emb.h5", device="cpu")
    out = train_expert(None, tmp_path / "e" / "expert_0.h5", data=tmp_path / "data",
                       emb=tmp_path / "emb.h5")
    assert_refused(out, "too few training pairs", "1 image")
    assert "diverged" not in out.stderr
    assert no_outputs(tmp_path / "e")


def test_divergence_without_a_checkpoint_does_not_claim_one(store, tmp_path):
    cfg = {**DISTILL, "lr_min": None, "lr_init": 1e6, "checkpoint_every": 0}
    out = distill(store, tmp_path, cfg=cfg)
    assert_refused(out, "diverged at iteration", "Lower")
    assert "checkpoint" not in out.stderr
    assert no_outputs(tmp_path / "d")


# ------------------------------------------------------------------ 10. tracebacks

def test_deeply_nested_annotation_json(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    ann.write_text("[" * 200_000 + "]" * 200_000)
    assert_refused(prepare(cfg, tmp_path), "dataset_x.json", "nested too deeply")
    assert no_outputs(tmp_path / "out")


def test_deeply_nested_config_json(tmp_path):
    (tmp_path / "c.json").write_text("{\"dataset\": " + "[" * 200_000 + "]" * 200_000 + "}")
    out = subprocess.run([sys.executable, "-m", "vldd", "prepare-dataset", "--config-json",
                          f"@{tmp_path / 'c.json'}", "--out-dir", tmp_path / "out"],
                         capture_output=True, text=True)
    assert_refused(out, "--config-json", "nested too deeply")


def test_misspelt_timm_kwarg(store, tmp_path):
    model = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "kwargs": {"drop_rte": 0.1}}}
    out = train_expert(store, tmp_path / "e" / "expert_0.h5", model=model)
    assert_refused(out, "model.image_encoder.kwargs", "drop_rte", "Fix or remove")
    assert no_outputs(tmp_path / "e")


def test_truncated_captions_parquet(store, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(store / "data", data)
    raw = (data / "captions.parquet").read_bytes()
    (data / "captions.parquet").write_bytes(raw[: len(raw) // 2])
    out = vldd("embed-captions", "--data", data, "--out", tmp_path / "e" / "emb.h5",
               config={"model": MODEL})
    assert_refused(out, "captions.parquet", "rerun prepare_dataset")
    out = train_expert(store, tmp_path / "e" / "expert_0.h5", data=data)
    assert_refused(out, "captions.parquet")
    assert no_outputs(tmp_path / "e")


def test_pair_set_with_a_string_lr(store, coreset, tmp_path):
    pairs = altered(coreset, tmp_path / "p.h5", kind="distilled", lr_image="fast")
    out = evaluate(store, pairs, tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "p.h5", "damaged pair set", "Delete it")
    assert no_outputs(tmp_path / "e")


def _unshare_ok():
    return shutil.which("unshare") and subprocess.run(
        ["unshare", "-rm", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm (mount namespaces)")
def test_read_only_output_folder_is_refused_before_training(store, tmp_path):
    """On a read-only mount (root ignores chmod, so a mount it is)."""
    (tmp_path / "ro").mkdir()
    cfg = json.dumps({"model": MODEL, "experts": EXPERTS})
    script = (f"mount --bind {tmp_path}/ro {tmp_path}/ro && mount -o remount,ro,bind "
              f"{tmp_path}/ro && exec {sys.executable} -m vldd train-expert --config-json "
              f"'{cfg}' --device cpu --data {store}/data --embeddings {store}/emb.h5 "
              f"--index 0 --out {tmp_path}/ro/e/expert_0.h5")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, timeout=300, env={**os.environ})
    assert_refused(out, "--out", "not writable", "choose another output path")
    assert "epoch" not in out.stderr                # refused before any training
    assert no_outputs(tmp_path / "ro")


@pytest.mark.skipif(not _unshare_ok(), reason="needs unshare -rm (mount namespaces)")
def test_full_disk_gives_one_error_and_keeps_finished_epochs(store, tmp_path):
    """A 20 MB file system: the epoch files fit, the final trajectory does not."""
    (tmp_path / "small").mkdir()
    # float32 storage: the assembled trajectory is as large as the epoch files together
    float32 = {"dtype": "float32", "compression": "none", "offsets": False}
    cfg = json.dumps({"model": MODEL, "experts": {**EXPERTS, "storage": float32}})
    # room for the epoch files of every epoch, not for the assembled trajectory too
    from vldd.stages.train_expert import train_expert
    train_expert(store / "data", store / "emb.h5", MODEL, {**EXPERTS, "storage": float32}, 0,
                 tmp_path / "full_size.h5", device="cpu")
    size = (tmp_path / "full_size.h5").stat().st_size * 3 // 2
    script = (f"mount -t tmpfs -o size={size} tmpfs {tmp_path}/small && {sys.executable} -m "
              f"vldd train-expert --config-json '{cfg}' --device cpu --data {store}/data "
              f"--embeddings {store}/emb.h5 --index 0 --out {tmp_path}/small/expert_0.h5; "
              f"echo rc=$?; ls -a {tmp_path}/small {tmp_path}/small/expert_0.h5.ckpt")
    out = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True,
                         text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1 and "ENOSPC" in lines[0] and "free space" in lines[0], out.stderr
    assert "Traceback" not in out.stderr, out.stderr  # h5py's dealloc failures stay quiet
    assert "rc=2" in out.stdout                     # not a segfault (139)
    assert ".tmp-" not in out.stdout                # no temporary file left
    assert "expert_0.h5\n" not in out.stdout        # no half-written trajectory
    assert "epoch_0003.h5" in out.stdout            # the finished epochs are kept (resume)


def test_stale_temporary_files_of_killed_writers_are_removed(store, tmp_path):
    out_dir = tmp_path / "c"
    out_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = out_dir / f".pairs.h5.tmp-{dead}"
    stale.write_bytes(b"half")
    out = vldd("select-coreset", "--data", store / "data", "--embeddings", store / "emb.h5",
               "--kind", "random", "--budget", 4, "--out", out_dir / "pairs.h5",
               config={"model": MODEL, "coresets": {}})
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in out_dir.iterdir()) == ["pairs.h5"]


def test_sigterm_removes_partial_files_and_keeps_the_checkpoint(store, tmp_path):
    """Snakemake or Slurm stopping a job (SIGTERM): no temporary file stays, the last
    checkpoint does (a rerun resumes from it), and no output looks finished."""
    import signal
    import time

    cfg = {**DISTILL, "iterations": 100_000, "checkpoint_every": 1}
    d = tmp_path / "d"
    cmd = [sys.executable, "-m", "vldd", "--threads", "1", "distill", "--config-json",
           json.dumps({"model": MODEL, "distill": cfg}), "--device", "cpu", "--data",
           str(store / "data"), "--embeddings", str(store / "emb.h5"), "--experts",
           str(store / "expert_0.h5"), "--budget", "6", "--out", str(d / "pairs.h5"),
           "--curve", str(d / "curve.parquet")]
    # PYTHONFAULTHANDLER: a job that does not stop is aborted below with its stacks printed
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    deadline = time.time() + 240
    while not (d / "pairs.h5.ckpt.h5").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate()
        pytest.fail("distill ran on for 120 s after SIGTERM; its stacks:\n" + err[-6000:])
    assert proc.returncode == 130, err[-2000:]
    assert sorted(p.name for p in d.iterdir()) == ["pairs.h5.ckpt.h5"]


def test_a_stop_signal_landing_in_a_finaliser_is_delivered_again(tmp_path):
    """Python swallows an exception raised in __del__ (it goes to sys.unraisablehook): a
    SIGTERM handled while an h5py or torch object is being freed must still stop the job."""
    script = tmp_path / "stop.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "from vldd import cli\n"
        "signal.signal(signal.SIGTERM, cli._terminate)\n"
        "sys.unraisablehook = cli._unraisable\n"
        "class Freed:\n"
        "    def __del__(self):\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "        time.sleep(0.5)\n"
        "try:\n"
        "    Freed()\n"
        "    t = time.time()\n"
        "    while time.time() - t < 5:\n"
        "        pass\n"
        "    print('ran on')\n"
        "except KeyboardInterrupt:\n"
        "    print('stopped')\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60)
    assert out.stdout.strip() == "stopped", out.stdout + out.stderr[-2000:]


def test_stale_staging_folder_of_a_killed_prepare_is_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / "out" / f".prepare-{dead}-abc"
    stale.mkdir(parents=True)
    (stale / "images.h5").write_bytes(b"half")
    out = prepare({"dataset": DATASET}, tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["captions.parquet",
                                                                    "images.h5"]


# ------------------------------------------------------------------ 11. NaN scores

def test_recall_refuses_nan_scores():
    from vldd.errors import VlddError
    from vldd.metrics import recall

    with pytest.raises(VlddError, match="NaN/inf"):
        recall(np.full((4, 20), np.nan), np.repeat(np.arange(4), 5))


def test_pair_set_with_nan_pixels(store, coreset, tmp_path):
    pairs = tmp_path / "p.h5"
    shutil.copy(coreset, pairs)
    with h5py.File(pairs, "r+") as f:
        f["images"][0, 0, 0, 0] = np.nan
    out = evaluate(store, pairs, tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "p.h5", "images hold NaN", "Delete it")
    assert no_outputs(tmp_path / "e")


# ------------------------------------------------------------------ 12. CUDA generator

def test_cuda_rng_state_is_absent_on_cpu_and_restoring_none_is_a_no_op():
    """The CPU path only (no GPU here): nothing is stored, nothing restored."""
    from vldd.model import cuda_rng_state, set_cuda_rng_state
    assert cuda_rng_state("cpu") is None
    set_cuda_rng_state(None, "cpu")


# ------------------------------------------------------------------ more of our own

def test_distill_budget_larger_than_the_training_set(store, tmp_path):
    out = distill(store, tmp_path, budget=500)
    assert_refused(out, "500", "larger than the training set")
    assert no_outputs(tmp_path / "d")


def test_expert_file_with_a_missing_dataset(store, tmp_path):
    bad = tmp_path / "expert_cut.h5"
    shutil.copy(store / "expert_0.h5", bad)
    with h5py.File(bad, "r+") as f:
        del f["text/params"]
    out = distill(store, tmp_path, experts=[bad])
    assert_refused(out, "expert_cut.h5", "damaged trajectory", "rerun train_expert")
    assert no_outputs(tmp_path / "d")


def test_another_vldd_file_given_as_expert(store, tmp_path):
    out = distill(store, tmp_path, experts=[store / "emb.h5"])
    assert_refused(out, "emb.h5", "vldd/embeddings", "expected vldd/trajectory")
    assert no_outputs(tmp_path / "d")


def test_empty_test_split(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    edit_annotations(ann, lambda imgs: [e.update(split="val") for e in imgs
                                        if e["split"] == "test"])
    assert_refused(prepare(cfg, tmp_path), "no test images")
    assert no_outputs(tmp_path / "out")


def test_empty_annotation_file(karpathy, tmp_path):  # noqa: F811
    cfg, ann, _ = karpathy
    ann.write_bytes(b"")
    assert_refused(prepare(cfg, tmp_path), "dataset_x.json", "not valid JSON")
    assert no_outputs(tmp_path / "out")


def test_symlink_loop_in_image_root(karpathy, tmp_path):  # noqa: F811
    cfg, _, root = karpathy
    (root / "imgs" / "3.png").unlink()
    (root / "imgs" / "3.png").symlink_to(root / "imgs" / "3.png")
    assert_refused(prepare(cfg, tmp_path), "3.png", "image file not found")
    assert no_outputs(tmp_path / "out")


def test_unknown_config_section(tmp_path):
    out = prepare({"dataset": DATASET, "distil": {}}, tmp_path)
    assert_refused(out, "distil", "unknown key")
    assert no_outputs(tmp_path / "out")


def test_float_where_an_integer_belongs(store, tmp_path):
    out = distill(store, tmp_path, cfg={**DISTILL, "iterations": 3.5})
    assert_refused(out, "distill.iterations", "3.5")
    assert no_outputs(tmp_path / "d")


def test_device_with_a_trailing_newline(tmp_path):
    out = prepare({"dataset": DATASET, "device": "cpu\n"}, tmp_path)
    assert_refused(out, "device")


def test_pair_set_of_one_pair_is_too_few(store, coreset, tmp_path):
    pairs = tmp_path / "p.h5"
    with h5py.File(coreset) as src, h5py.File(pairs, "w") as f:
        for key, value in src.attrs.items():
            f.attrs[key] = value
        for name in ("images", "texts", "caption_ids"):
            f[name] = src[name][:1]
    out = evaluate(store, pairs, tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "too few training pairs")
    assert no_outputs(tmp_path / "e")


def test_output_path_that_is_a_folder(store, tmp_path):
    (tmp_path / "e" / "seed0.parquet").mkdir(parents=True)
    out = evaluate(store, store / "expert_0.h5", tmp_path / "e" / "seed0.parquet")
    assert_refused(out, "is a folder", "give a file path")


# ------------------------------------------------------------------ 12. the lazy store

@pytest.mark.parametrize("name", ["images.h5", "emb.h5"])
def test_a_truncated_store_read_lazily_is_refused_before_any_output(store, coreset, tmp_path,
                                                                     name):
    """The images and embeddings are read when used, not when loaded; a store cut short is
    still refused at once, naming the file, with nothing written."""
    data = tmp_path / "data"
    shutil.copytree(store / "data", data)
    shutil.copy(store / "emb.h5", tmp_path / "emb.h5")
    bad = data / name if name == "images.h5" else tmp_path / name
    blob = bad.read_bytes()
    bad.write_bytes(blob[:int(len(blob) * 0.6)])
    out = evaluate(store, coreset, tmp_path / "e" / "seed0.parquet", data=data,
                   emb=tmp_path / "emb.h5")
    assert_refused(out, name)
    assert no_outputs(tmp_path / "e")
