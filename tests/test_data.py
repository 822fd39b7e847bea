"""Tests for vldd.synthetic and vldd.stages.prepare_dataset: generator determinism, the prepared store's
format, the Karpathy and BLIP readers, bad-input errors and the retrieval maps."""
from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
from PIL import Image

from vldd import io, synthetic
from vldd.prepared import load_prepared
from vldd.stages import prepare_dataset as data
from vldd.errors import VlddError

RES = 16


# ---------------------------------------------------------------- fixtures

def _png(path, colour, size=(20, 12)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _cfg(source, **sections):
    cfg = {"name": "t", "source": source, "resolution": RES, "max_words": 30,
           "synthetic": {"n_train": 20, "n_val": 4, "n_test": 8, "captions_per_image": 3,
                         "seed": 0},
           "karpathy": {"annotations": None, "image_root": None},
           "blip": {"train": None, "val": None, "test": None, "image_root": None}}
    cfg.update(sections)
    return cfg


# Karpathy images in file order; solid colours let a test find each image in the store.
K_IMAGES = [  # (filepath, filename, split, colour, sentences)
    ("imgs", "a.png", "test", (255, 0, 0), ["A Dog (running)!  fast.", "red one"]),
    ("", "b.png", "train", (0, 255, 0), ["Green: thing;", "another caption"]),
    (None, "c.png", "val", (0, 0, 255), ["blue ~ one", "blue two"]),
    ("imgs", "d.png", "restval", (255, 255, 0), ["yellow one", "yellow two"]),
    ("imgs", "e.png", "train", (0, 255, 255), ["cyan one", "cyan two", "cyan three"]),
]


@pytest.fixture
def karpathy(tmp_path):
    root = tmp_path / "root"
    entries = []
    for filepath, filename, split, colour, sents in K_IMAGES:
        _png(root / (filepath or "") / filename, colour)
        entry = {"filename": filename, "split": split, "sentences": [{"raw": s} for s in sents]}
        if filepath is not None:
            entry["filepath"] = filepath
        entries.append(entry)
    ann = tmp_path / "dataset_k.json"
    ann.write_text(json.dumps({"images": entries}))
    return _cfg("karpathy", karpathy={"annotations": str(ann), "image_root": str(root)})


@pytest.fixture
def blip(tmp_path):
    root = tmp_path / "root"
    for name, colour in [("t1", (10, 0, 0)), ("t2", (20, 0, 0)), ("v1", (30, 0, 0)),
                         ("s1", (40, 0, 0)), ("s2", (50, 0, 0))]:
        _png(root / "x" / f"{name}.png", colour)
    files = {
        "train": [{"image": "x/t1.png", "caption": "c1", "image_id": "7"},
                  {"image": "x/t2.png", "caption": "c2", "image_id": "8"},
                  {"image": "x/t1.png", "caption": "c3", "image_id": "7"}],
        "val": [{"image": "x/v1.png", "caption": ["v a", "v b"]}],
        "test": [{"image": "x/s1.png", "caption": ["s a", "s b"]},
                 {"image": "x/s2.png", "caption": ["s c"]}],
    }
    section = {"image_root": str(root)}
    for split, entries in files.items():
        (tmp_path / f"{split}.json").write_text(json.dumps(entries))
        section[split] = str(tmp_path / f"{split}.json")
    return _cfg("blip", blip=section)


# ---------------------------------------------------------------- pre_caption

def test_pre_caption_lowercases_strips_punctuation_and_truncates():
    assert data.pre_caption('  A "Dog" (runs)!\tfast; ok: #1 ~*x. ') == "a dog runs fast ok 1 x"
    assert data.pre_caption("one two three four", max_words=2) == "one two"
    assert data.pre_caption("it's a well-known cat, yes?") == "it's a well-known cat, yes?"


# ---------------------------------------------------------------- synthetic generator

def test_synthetic_is_deterministic_by_seed_and_differs_across_seeds():
    a = synthetic.generate(6, 2, 3, 4, RES, seed=1)
    b = synthetic.generate(6, 2, 3, 4, RES, seed=1)
    c = synthetic.generate(6, 2, 3, 4, RES, seed=2)
    assert a[0].tobytes() == b[0].tobytes() and a[1] == b[1] and a[2] == b[2]
    assert a[0].tobytes() != c[0].tobytes()
    assert a[1] != c[1]


def test_synthetic_shapes_splits_and_distinct_captions():
    images, captions, splits = synthetic.generate(10, 3, 5, 5, RES, seed=0)
    assert images.shape == (18, RES, RES, 3) and images.dtype == np.uint8
    assert splits == ["train"] * 10 + ["val"] * 3 + ["test"] * 5
    assert len(captions) == 18
    for caps in captions:
        assert len(caps) == 5 and len(set(caps)) == 5
        assert all(data.pre_caption(c) for c in caps)
    # Images are not blank: every one has object pixels far from its background colour.
    assert all(np.ptp(img.reshape(-1, 3), axis=0).max() > 60 for img in images)


def test_synthetic_images_vary_in_content():
    images, captions, _ = synthetic.generate(40, 0, 1, 1, 64, seed=3)
    assert len({img.tobytes() for img in images}) == len(images)
    words = {w for caps in captions for w in data.pre_caption(caps[0]).split()}
    # Several colours and shapes are named across 41 images (not one repeated scene).
    assert len(words & {"red", "green", "blue", "yellow", "orange", "purple", "cyan", "pink",
                        "crimson", "emerald", "cobalt", "lemon", "violet", "aqua", "rose"}) >= 4


# ---------------------------------------------------------------- prepare: synthetic

def test_prepare_synthetic_writes_consistent_store(tmp_path):
    data.prepare_dataset(_cfg("synthetic"), tmp_path / "d")
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["captions.parquet", "images.h5"]
    with h5py.File(tmp_path / "d" / "images.h5", "r") as f:
        assert f.attrs["schema"] == "vldd/images"
        assert f.attrs["source"] == "synthetic" and f.attrs["resolution"] == RES
        assert f["images"].shape == (32, RES, RES, 3) and f["images"].dtype == np.uint8
        assert f["images"].chunks == (32, RES, RES, 3)
        assert f["split"].dtype == np.uint8
        assert list(f["split"][:]) == [0] * 20 + [1] * 4 + [2] * 8
        assert f["filename"].asstr()[0] == "synthetic_000000"
    p = load_prepared(tmp_path / "d")
    caps = p.captions
    assert list(caps.columns) == ["caption_id", "image_index", "split", "caption", "raw"]
    assert caps["caption_id"].tolist() == list(range(32 * 3))
    assert caps["image_index"].tolist() == [i for i in range(32) for _ in range(3)]
    assert (caps["split"].to_numpy() == p.image_split[caps["image_index"]]).all()
    assert caps["caption"].tolist() == [data.pre_caption(r) for r in caps["raw"]]
    assert io.read_parquet_meta(tmp_path / "d" / "captions.parquet")["schema"] == "vldd/captions"
    images, captions, _ = synthetic.generate(20, 4, 8, 3, RES, seed=0)
    assert np.array_equal(p.images, images)
    assert caps["raw"].tolist()[:3] == captions[0]


def test_prepare_is_byte_identical_across_runs(tmp_path):
    data.prepare_dataset(_cfg("synthetic"), tmp_path / "a")
    data.prepare_dataset(_cfg("synthetic"), tmp_path / "b")
    for name in ("images.h5", "captions.parquet"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


# ---------------------------------------------------------------- prepare: Karpathy, BLIP

def test_prepare_karpathy_counts_order_resize_and_captions(karpathy, tmp_path):
    data.prepare_dataset(karpathy, tmp_path / "d")
    p = load_prepared(tmp_path / "d")
    # Stored in split order, file order within a split; restval counts as train.
    assert list(p.filenames) == ["b.png", "imgs/d.png", "imgs/e.png", "c.png", "imgs/a.png"]
    assert list(p.image_split) == ["train", "train", "train", "val", "test"]
    assert p.images.shape == (5, RES, RES, 3)
    assert tuple(p.images[4, 8, 8]) == (255, 0, 0) and tuple(p.images[0, 0, 0]) == (0, 255, 0)
    assert len(p.captions) == 11
    test = p.split_captions("test")
    assert test["caption"].tolist() == ["a dog running fast", "red one"]
    assert test["raw"].tolist()[0] == "A Dog (running)!  fast."
    assert p.split_captions("train")["caption"].tolist()[0] == "green thing"


def test_prepare_blip_dedups_train_by_image_id(blip, tmp_path):
    data.prepare_dataset(blip, tmp_path / "d")
    p = load_prepared(tmp_path / "d")
    assert list(p.filenames) == ["x/t1.png", "x/t2.png", "x/v1.png", "x/s1.png", "x/s2.png"]
    assert [int(p.images[i, 0, 0, 0]) for i in range(5)] == [10, 20, 30, 40, 50]
    train = p.split_captions("train")
    assert train["image_index"].tolist() == [0, 0, 1]
    assert train["caption"].tolist() == ["c1", "c3", "c2"]
    assert len(p.split_captions("val")) == 2 and len(p.split_captions("test")) == 3


def test_prepare_blip_without_val_has_no_val_split(blip, tmp_path):
    blip["blip"]["val"] = None
    data.prepare_dataset(blip, tmp_path / "d")
    p = load_prepared(tmp_path / "d")
    assert len(p.split_images("val")) == 0 and len(p.split_images("test")) == 2


# ---------------------------------------------------------------- load + retrieval maps

def test_retrieval_maps_point_each_caption_to_its_image(blip, tmp_path):
    data.prepare_dataset(blip, tmp_path / "d")
    p = load_prepared(tmp_path / "d")
    # Caption ids: train 0,1 (t1) 2 (t2); val 3,4; test 5,6 (s1) 7 (s2).
    images, caption_ids, txt2img = p.retrieval_maps("test")
    assert images.tolist() == [3, 4]
    assert caption_ids.tolist() == [5, 6, 7]
    assert txt2img.tolist() == [0, 0, 1] and txt2img.dtype == np.int64
    images, caption_ids, txt2img = p.retrieval_maps("train")
    assert images.tolist() == [0, 1] and caption_ids.tolist() == [0, 1, 2]
    assert txt2img.tolist() == [0, 0, 1]


def test_load_prepared_rejects_missing_and_mismatched_files(blip, karpathy, tmp_path):
    with pytest.raises(VlddError, match="images.h5"):
        load_prepared(tmp_path / "nothing")
    data.prepare_dataset(blip, tmp_path / "a")
    data.prepare_dataset(karpathy, tmp_path / "b")
    (tmp_path / "b" / "captions.parquet").replace(tmp_path / "a" / "captions.parquet")
    with pytest.raises(VlddError, match="different prepare runs"):
        load_prepared(tmp_path / "a")
    (tmp_path / "b" / "captions.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(VlddError, match="captions.parquet"):
        load_prepared(tmp_path / "b")


# ---------------------------------------------------------------- bad input

def _expect_failure(cfg, out, match):
    out.mkdir()
    with pytest.raises(VlddError, match=match):
        data.prepare_dataset(cfg, out)
    assert list(out.iterdir()) == []  # no output, no staging leftovers


def test_missing_image_names_the_file_and_entry(karpathy, tmp_path):
    (tmp_path / "root" / "imgs" / "d.png").unlink()
    _expect_failure(karpathy, tmp_path / "out", r"d\.png: image file not found.*images\[3\]")


def test_corrupt_image_is_reported_and_nothing_is_written(karpathy, tmp_path):
    (tmp_path / "root" / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    _expect_failure(karpathy, tmp_path / "out", r"c\.png: unreadable or corrupt image")


def test_empty_caption_names_image_and_caption_index(karpathy, tmp_path):
    ann = tmp_path / "dataset_k.json"
    d = json.loads(ann.read_text())
    d["images"][2]["sentences"][1]["raw"] = " ... !"
    ann.write_text(json.dumps(d))
    _expect_failure(karpathy, tmp_path / "out", r"images\[2\] \(c\.png\): caption 1 is empty")


def test_missing_images_key_is_rejected(karpathy, tmp_path):
    (tmp_path / "dataset_k.json").write_text(json.dumps({"annotations": []}))
    _expect_failure(karpathy, tmp_path / "out", r"dataset_k\.json: no top-level 'images'")


def test_bad_annotation_files_are_rejected(karpathy, blip, tmp_path):
    ann = tmp_path / "dataset_k.json"
    ann.write_text("{not json")
    _expect_failure(karpathy, tmp_path / "o1", "not valid JSON")
    ann.unlink()
    _expect_failure(karpathy, tmp_path / "o2", "annotation file not found")
    ann.write_text(json.dumps({"images": [{"filename": "b.png", "sentences": [{"raw": "x"}]}]}))
    _expect_failure(karpathy, tmp_path / "o3", r"images\[0\] \(b\.png\): split is None")
    ann.write_text(json.dumps({"images": [{"filename": "b.png", "split": "train",
                                           "sentences": [{"raw": "x"}]}]}))
    _expect_failure(karpathy, tmp_path / "o4", "no test images")
    (tmp_path / "test.json").write_text(json.dumps([{"image": "x/s1.png", "caption": "s"}]))
    _expect_failure(blip, tmp_path / "o5", r"test\.json: entry 0.*list of strings")


def test_unknown_source_is_rejected(tmp_path):
    _expect_failure(_cfg("imagenet"), tmp_path / "out", "unknown source")


def test_failure_of_second_file_removes_the_first(monkeypatch, tmp_path):
    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(io, "write_parquet", broken)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OSError, match="disk full"):
        data.prepare_dataset(_cfg("synthetic"), out)
    assert list(out.iterdir()) == []


def test_the_prepared_store_reads_only_the_rows_asked_for(tmp_path):
    """H5Rows (the prepared images, the embeddings) gives what numpy indexing of the whole
    array gives, for ints, slices, index arrays in any order with repeats, masks and lazy
    views, and refuses a row out of range."""
    import h5py

    from vldd.prepared import H5Rows

    a = np.random.default_rng(0).integers(0, 255, (50, 4, 4, 3)).astype(np.uint8)
    with h5py.File(tmp_path / "r.h5", "w") as f:
        f.create_dataset("images", data=a, chunks=(8, 4, 4, 3))
    rows = H5Rows(tmp_path / "r.h5", "images", a.shape, a.dtype)
    for idx in ([3, 1, 1, 49, 0, 2, 3, 4], [], [-1, 5], list(range(50))[::-3]):
        idx = np.asarray(idx, dtype=np.int64)
        assert np.array_equal(rows[idx], a[idx]), idx
    assert np.array_equal(rows[5], a[5]) and np.array_equal(rows[2:9], a[2:9])
    assert np.array_equal(np.asarray(rows), a)
    assert rows[4, 1, 2].tolist() == a[4, 1, 2].tolist()
    assert np.array_equal(rows[[1, 2], 0], a[[1, 2], 0])
    mask = np.zeros(50, bool)
    mask[[3, 7]] = True
    assert np.array_equal(rows[mask], a[mask])
    view = rows.view([7, 2, 9, 2])
    assert len(view) == 4 and view.shape == (4, 4, 4, 3)
    assert np.array_equal(view[1:3], a[[2, 9]]) and np.array_equal(view[np.array([3, 0])], a[[2, 7]])
    with pytest.raises(IndexError, match="out of range"):
        rows[np.array([50])]
