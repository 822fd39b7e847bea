"""The prepared data store (images.h5 + captions.parquet) and the sources that fill it.

Sources: "synthetic" (procedural, vldd.synthetic), "karpathy" (one Karpathy-split JSON
such as dataset_flickr30k.json) and "blip" (BLIP's per-split JSON files). Every source is
reduced to one list of images, each with a split and its captions; images are stored in
split order (train, val, test; file order within a split) at resolution x resolution.
Annotations and image paths are checked before anything is written, and both output
files appear together or not at all.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, is_dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from .. import config, io
from ..captions import is_blank, pre_caption
from ..errors import VlddError
from ..prepared import CAPTION_COLUMNS, SPLIT_CODE, SPLITS
from ..progress import Progress

log = logging.getLogger(__name__)

CHUNK = 64  # images per HDF5 chunk and per decoding block
MAX_RESOLUTION = 1024


@dataclass
class _Item:
    """One image to store: where it comes from, its split and raw captions."""
    filename: str
    split: str          # train / val / test
    captions: list
    where: str          # "annotation file: entry i", for error messages
    path: Path | None = None  # None for synthetic images (already in memory)


# ---------------------------------------------------------------- config helpers

def _int(section: dict, key: str, where: str, minimum: int) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise VlddError(f"config {where}.{key} = {value!r}: must be an integer >= {minimum}.")
    return int(value)


def _path(section: dict, key: str, where: str) -> Path:
    value = section.get(key)
    if not value:
        raise VlddError(f"config {where}.{key} is not set: set it to the path of the "
                        f"{'image folder' if key == 'image_root' else 'annotation file'} "
                        "(relative paths are relative to the working directory).")
    return Path(value)


def _read_json(path: Path, key: str):
    if not path.is_file():
        raise VlddError(f"{path}: annotation file not found (config {key}). Download it or "
                        "fix the path (relative paths are relative to the working directory).")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise VlddError(f"{path}: not valid JSON ({why}). Re-download the annotation file "
                        f"or point config {key} at the right one.") from exc


def _str_field(entry, key: str, where: str, fix: str) -> str:
    if not isinstance(entry, dict) or not isinstance(entry.get(key), str):
        raise VlddError(f"{where}: no string field '{key}'. {fix}")
    try:
        entry[key].encode("utf-8")
    except UnicodeEncodeError as exc:   # a lone UTF-16 surrogate such as "\ud800"
        raise VlddError(f"{where}: field '{key}' holds an invalid character "
                        f"({entry[key][exc.start:exc.end]!r}, a lone surrogate): fix the "
                        "annotation file's text.") from exc
    return entry[key]


# ---------------------------------------------------------------- sources

def _karpathy_items(section: dict) -> list[_Item]:
    ann = _path(section, "annotations", "dataset.karpathy")
    root = _path(section, "image_root", "dataset.karpathy")
    data = _read_json(ann, "dataset.karpathy.annotations")
    fix = ('A Karpathy split file looks like {"images": [{"filename", "filepath", "split", '
           '"sentences": [{"raw"}]}]}; for BLIP per-split files use source: blip.')
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise VlddError(f"{ann}: no top-level 'images' list, so this is not a Karpathy split "
                        f"file. {fix}")
    items = []
    for i, entry in enumerate(data["images"]):
        where = f"{ann}: images[{i}]"
        filename = _str_field(entry, "filename", where, fix)
        split = entry.get("split")
        if split not in SPLIT_CODE:
            raise VlddError(f"{where} ({filename}): split is {split!r}, expected one of "
                            "train, restval, val, test. Fix the entry.")
        sentences = entry.get("sentences")
        if not isinstance(sentences, list):
            raise VlddError(f"{where} ({filename}): no 'sentences' list. {fix}")
        raws = [_str_field(s, "raw", f"{where}.sentences[{j}]", fix)
                for j, s in enumerate(sentences)]
        rel = f"{entry['filepath']}/{filename}" if entry.get("filepath") else filename
        items.append(_Item(rel, SPLITS[SPLIT_CODE[split]], raws, where, root / rel))
    return items


def _blip_items(section: dict) -> list[_Item]:
    root = _path(section, "image_root", "dataset.blip")
    items: list[_Item] = []
    for split in SPLITS:
        if split == "val" and not section.get("val"):
            continue  # val is optional: the method never uses it
        ann = _path(section, split, "dataset.blip")
        data = _read_json(ann, f"dataset.blip.{split}")
        if not isinstance(data, list):
            raise VlddError(f"{ann}: expected a JSON list of entries (BLIP {split} format). "
                            "For a Karpathy split file ({\"images\": [...]}) use source: "
                            "karpathy.")
        if split == "train":  # one entry per caption; images in order of first image_id
            fix = 'BLIP train entries look like {"image": path, "caption": str, "image_id": str}.'
            by_id: dict[str, _Item] = {}
            for i, entry in enumerate(data):
                where = f"{ann}: entry {i}"
                image = _str_field(entry, "image", where, fix)
                caption = _str_field(entry, "caption", where, fix)
                if entry.get("image_id") is None:
                    raise VlddError(f"{where}: no 'image_id'. {fix}")
                item = by_id.setdefault(str(entry["image_id"]),
                                        _Item(image, "train", [], where, root / image))
                if item.filename != image:
                    raise VlddError(f"{where}: image_id {entry['image_id']!r} names {image}, "
                                    f"but {item.where} gave it {item.filename}. Fix one of them.")
                item.captions.append(caption)
            items.extend(by_id.values())
        else:  # one entry per image with a list of captions
            fix = f'BLIP {split} entries look like {{"image": path, "caption": [str, ...]}}.'
            for i, entry in enumerate(data):
                where = f"{ann}: entry {i}"
                image = _str_field(entry, "image", where, fix)
                caps = entry.get("caption")
                if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                    raise VlddError(f"{where} ({image}): 'caption' must be a list of strings "
                                    f"(is this a train file?). {fix}")
                items.append(_Item(image, split, list(caps), where, root / image))
    return items


def _synthetic(section: dict, resolution: int):
    from .. import synthetic

    where = "dataset.synthetic"
    n_train = _int(section, "n_train", where, 1)
    n_val = _int(section, "n_val", where, 0)
    n_test = _int(section, "n_test", where, 1)
    k = _int(section, "captions_per_image", where, 1)
    seed = _int(section, "seed", where, 0)
    images, captions, splits = synthetic.generate(n_train, n_val, n_test, k, resolution, seed)
    items = [_Item(f"synthetic_{i:06d}", s, caps, f"synthetic image {i}")
             for i, (caps, s) in enumerate(zip(captions, splits))]
    return images, items


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode as 8-bit RGB: 16/32-bit grey scaled (not clipped) to 8 bits, transparent
    pixels composited on white (their hidden colour is arbitrary), CMYK/palette converted."""
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        grey = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode != "I" or grey.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(grey * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode == "F":
        raise ValueError("floating-point image mode F: convert it to 8-bit RGB first")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def _load_image(item: _Item, resolution: int) -> np.ndarray:
    try:
        with Image.open(item.path) as im:
            rgb = _to_rgb(im)
            # The paper's test transform: plain bicubic resize to a square, no crop.
            return np.asarray(rgb.resize((resolution, resolution), Image.BICUBIC), np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise VlddError(f"{item.path}: unreadable or corrupt image ({exc}), named by "
                        f"{item.where}. Replace the file or drop the entry.") from exc


def _check_duplicates(items) -> None:
    """Refuse one image file named by two entries: across splits that is train/test leakage,
    within a split one image counted twice."""
    seen: dict[str, _Item] = {}
    for it in items:
        if it.path is None:
            continue
        key = os.path.normpath(str(it.path))
        first = seen.setdefault(key, it)
        if first is not it:
            what = (f"in both the {first.split} and the {it.split} split (train/test leakage)"
                    if first.split != it.split else f"twice in the {it.split} split")
            raise VlddError(f"{it.path} is named {what}: by {first.where} and by {it.where}. "
                            "Keep one entry (merge their captions).")


def _remove_stale_stages(out_dir: Path) -> None:
    """Staging folders of prepare runs that were killed (SIGKILL, a crash)."""
    for old in out_dir.glob(".prepare-*-*"):
        pid = old.name.split("-")[1]
        if pid.isdigit() and int(pid) != os.getpid() and not io.pid_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)


def _check_distinct(table: pd.DataFrame, items) -> None:
    """Contrastive training and text retrieval need captions that differ."""
    train = table.loc[table["split"] == "train", "caption"]
    if train.nunique() < 2:
        origin = items[0].where.split(": ")[0]
        raise VlddError(f"{origin}: all {len(train)} training captions are identical after "
                        f"preprocessing ({train.iloc[0]!r}): nothing tells the images apart. "
                        "Use the real captions.")


# ---------------------------------------------------------------- prepare

def _items(cfg: dict):
    """(images in memory or None, the list of items) of the configured source."""
    source = cfg["source"]
    resolution = _int(cfg, "resolution", "dataset", 1)
    if resolution > MAX_RESOLUTION:
        raise VlddError(f"config dataset.resolution = {resolution}: at most {MAX_RESOLUTION} "
                        "(stored images grow with its square); the paper uses 224.")
    if source == "synthetic":
        return _synthetic(cfg["synthetic"], resolution)
    if source == "karpathy":
        return None, _karpathy_items(cfg["karpathy"])
    if source == "blip":
        return None, _blip_items(cfg["blip"])
    raise VlddError(f"config dataset.source = {source!r}: unknown source. Use one of "
                    "synthetic, karpathy, blip.")


def _caption_table(items, max_words: int, source: str) -> pd.DataFrame:
    """The captions table (CAPTION_COLUMNS), after every check that needs no image decoded:
    both splits present, no duplicate image, every image file there, no empty caption."""
    for split in ("train", "test"):
        if not any(it.split == split for it in items):
            raise VlddError(f"dataset ({source}): no {split} images. Check the annotation "
                            "file(s) and their split fields.")
    _check_duplicates(items)
    for it in items:
        if it.path is not None and not it.path.is_file():
            raise VlddError(f"{it.path}: image file not found, named by {it.where}. Check "
                            "image_root in the dataset config or download the images.")
    rows = []
    for idx, it in enumerate(items):
        if not it.captions:
            raise VlddError(f"{it.where} ({it.filename}): image has no captions. Add captions "
                            "or drop the entry.")
        for j, raw in enumerate(it.captions):
            cap = pre_caption(raw, max_words)
            if is_blank(cap):
                raise VlddError(f"{it.where} ({it.filename}): caption {j} is empty after "
                                f"preprocessing (raw {raw!r}). Fix or remove that caption.")
            rows.append((idx, it.split, cap, raw))
    table = pd.DataFrame(rows, columns=CAPTION_COLUMNS[1:])
    _check_distinct(table, items)
    table.insert(0, "caption_id", np.arange(len(table), dtype=np.int64))
    table["image_index"] = table["image_index"].astype(np.int64)
    return table


def prepare_dataset(dataset, out_dir) -> None:
    """Write out_dir/images.h5 and out_dir/captions.parquet from the `dataset` config section
    (vldd.config's typed object, or a dict)."""
    if not isinstance(dataset, dict) and not is_dataclass(dataset):
        raise VlddError("config 'dataset' must be a mapping with at least 'source'.")
    cfg = config.section("dataset", dataset).as_dict()
    images, items = _items(cfg)
    source, resolution = cfg["source"], cfg["resolution"]
    max_words = _int(cfg, "max_words", "dataset", 1)
    order = sorted(range(len(items)), key=lambda i: SPLIT_CODE[items[i].split])  # stable
    items = [items[i] for i in order]
    table = _caption_table(items, max_words, source)
    if images is not None:
        images = images[order]
        load = lambda i: images[i]  # noqa: E731
    else:
        load = lambda i: _load_image(items[i], resolution)  # noqa: E731
    out_dir = Path(out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Both files are written into a private staging folder and moved in at the end, so
    # a failure at any point (a corrupt image, a full disk) leaves neither behind.
    _remove_stale_stages(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".prepare-{os.getpid()}-", dir=out_dir))
    done = False
    try:
        _write_images(stage / "images.h5", cfg, items, load)
        io.write_parquet(table, stage / "captions.parquet",
                         meta=io.provenance("captions", cfg, source=source,
                                            resolution=resolution))
        os.replace(stage / "images.h5", out_dir / "images.h5")
        try:
            os.replace(stage / "captions.parquet", out_dir / "captions.parquet")
        except BaseException:
            (out_dir / "images.h5").unlink(missing_ok=True)
            raise
        done = True
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if not done and created and not any(out_dir.iterdir()):
            out_dir.rmdir()


def _write_images(path: Path, cfg: dict, items, load) -> None:
    """images.h5, streamed block by block (a full COCO does not fit in memory), so the images
    dataset is made directly, with h5_dataset's track_times=False."""
    n, resolution = len(items), cfg["resolution"]
    prov = io.provenance("images", cfg, source=cfg["source"], resolution=resolution)
    with io.h5_writer(path, prov) as f, \
            ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        dset = f.create_dataset("images", shape=(n, resolution, resolution, 3),
                                dtype=np.uint8, chunks=(min(CHUNK, n), resolution,
                                                        resolution, 3), track_times=False)
        bar = Progress(n, f"prepare_dataset {cfg['name']}", unit="image", log=log)
        for start in range(0, n, CHUNK):
            block = list(pool.map(load, range(start, min(n, start + CHUNK))))
            dset[start:start + len(block)] = np.stack(block)
            bar.update(len(block))
        io.h5_dataset(f, "split", np.array([SPLIT_CODE[it.split] for it in items], np.uint8))
        io.h5_dataset(f, "filename", io.as_str_array([it.filename for it in items]))


# ---------------------------------------------------------------- load


