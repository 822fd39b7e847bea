"""A procedural image-caption dataset: the pipeline's default, needing no downloads.

Each image shows 1-3 copies of one object (shape, colour, size) in one region of a
plain background; each caption is a paraphrase of that content. Attributes are drawn
independently, so many images share some but not all of them: retrieval has to bind
colour, shape, size, count and place together, which makes the task hard but learnable.
Everything is drawn from numpy Generators seeded by (seed, image index), so the same
seed gives identical bytes and an image does not depend on how many images follow it.
"""
from __future__ import annotations

import re

import numpy as np
from PIL import Image

INTERNAL = 64   # render size; resized with PIL when another resolution is asked for
SUPER = 2       # supersampling factor per axis, for cheap anti-aliasing

# name -> (RGB, synonyms). Colours are far apart so every one is nameable at 16 px.
COLOURS = {
    "red": ((220, 30, 30), ["red", "crimson", "scarlet"]),
    "green": ((30, 170, 40), ["green", "emerald", "grass-green"]),
    "blue": ((40, 70, 230), ["blue", "royal blue", "cobalt"]),
    "yellow": ((240, 220, 30), ["yellow", "lemon", "golden"]),
    "orange": ((250, 140, 20), ["orange", "tangerine", "amber"]),
    "purple": ((140, 40, 190), ["purple", "violet", "plum"]),
    "cyan": ((30, 210, 220), ["cyan", "turquoise", "aqua"]),
    "pink": ((250, 120, 190), ["pink", "rose", "bubblegum pink"]),
}
BACKGROUNDS = {
    "black": ((15, 15, 15), ["black", "dark"]),
    "dark grey": ((80, 80, 80), ["dark grey", "charcoal"]),
    "light grey": ((185, 185, 185), ["light grey", "pale grey"]),
    "beige": ((225, 210, 175), ["beige", "sand-coloured"]),
}
# shape -> [(singular, plural), ...]
SHAPES = {
    "circle": [("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")],
    "square": [("square", "squares"), ("block", "blocks"), ("square tile", "square tiles")],
    "triangle": [("triangle", "triangles"), ("triangular shape", "triangular shapes")],
    "cross": [("cross", "crosses"), ("plus sign", "plus signs")],
    "diamond": [("diamond", "diamonds"), ("rhombus", "rhombuses"), ("lozenge", "lozenges")],
    "ring": [("ring", "rings"), ("hollow circle", "hollow circles"), ("hoop", "hoops")],
    "star": [("star", "stars"), ("pointed star", "pointed stars")],
}
SIZES = {"small": (3.5, ["small", "tiny", "little"]), "large": (6.5, ["large", "big", "huge"])}
COUNTS = {1: ["one", "a", "a single", "1"], 2: ["two", "a pair of", "a couple of", "2"],
          3: ["three", "a trio of", "3"]}
# region -> (box for object centres in internal pixels, phrases after the object,
# short labels used as a caption prefix). Boxes are disjoint so a region name is unambiguous.
REGIONS = {
    "top left": ((7, 23, 7, 23), ["in the top left", "near the upper left corner",
                                  "in the top-left corner"], ["top-left", "upper left"]),
    "top right": ((41, 57, 7, 23), ["in the top right", "near the upper right corner",
                                    "in the top-right corner"], ["top-right", "upper right"]),
    "bottom left": ((7, 23, 41, 57), ["in the bottom left", "near the lower left corner",
                                      "in the bottom-left corner"], ["bottom-left", "lower left"]),
    "bottom right": ((41, 57, 41, 57), ["in the bottom right", "near the lower right corner",
                                        "in the bottom-right corner"],
                     ["bottom-right", "lower right"]),
    "centre": ((25, 39, 25, 39), ["in the centre", "in the middle", "at the center of the image"],
               ["centre", "middle"]),
}
TEMPLATES = [
    "{count} {size} {colour} {shape} {region}",
    "{label}: {count} {size} {colour} {shape}",
    "there {be} {count} {size} {colour} {shape} {region}",
    "{region} there {be} {count} {colour} {shape}, {size} in size",
    "{count} {shape}, {size} and {colour}, {region}",
    "a {bg} background with {count} {size} {colour} {shape} {region}",
    "{count} {colour} {shape} of {size} size {region} on a {bg} background",
    "picture of {count} {size} {colour} {shape} {region}",
]

# Sub-pixel sample grid in internal pixel units, shared by every image.
_G = (np.arange(INTERNAL * SUPER) + 0.5) / SUPER


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Inside-test for a shape of unit radius; dx, dy are offsets divided by the radius."""
    r = np.hypot(dx, dy)
    if shape == "circle":
        return r <= 1.0
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) <= 0.85
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.05
    if shape == "triangle":  # apex up, base at dy = 0.8
        return (dy <= 0.8) & (np.abs(dx) <= (dy + 1.0) * 0.55)
    if shape == "cross":
        return ((np.abs(dx) <= 0.32) & (np.abs(dy) <= 1.0)) | \
               ((np.abs(dy) <= 0.32) & (np.abs(dx) <= 1.0))
    if shape == "ring":
        return (r <= 1.0) & (r >= 0.55)
    if shape == "star":  # radius falls linearly from 1 at the five tips to 0.42 between them
        t = np.mod((np.arctan2(dy, dx) + np.pi / 2) * 5 / (2 * np.pi), 1.0)
        return r <= 0.42 + 0.58 * np.abs(t - 0.5) * 2
    raise ValueError(shape)


def _place(rng: np.random.Generator, box, count: int, radius: float) -> list[tuple[float, float]]:
    """Centres inside `box`, at least 2.15 radii apart; the spacing relaxes if the box is tight."""
    x0, x1, y0, y1 = box
    min_dist = 2.15 * radius
    iu = np.triu_indices(count, 1)
    for _ in range(10):  # 64 candidate layouts per round, first one that fits wins
        pts = rng.uniform((x0, y0), (x1, y1), size=(64, count, 2))
        if count == 1:
            return [tuple(pts[0, 0])]
        d = np.linalg.norm(pts[:, :, None, :] - pts[:, None, :, :], axis=-1)[:, iu[0], iu[1]]
        ok = np.flatnonzero(d.min(axis=1) >= min_dist)
        if ok.size:
            return [tuple(p) for p in pts[ok[0]]]
        min_dist *= 0.93  # tight fit (3 large in a small box): allow a little overlap
    return [tuple(p) for p in pts[np.argmax(d.min(axis=1))]]


def _scene(rng: np.random.Generator) -> dict:
    return {"shape": rng.choice(list(SHAPES)), "colour": rng.choice(list(COLOURS)),
            "size": rng.choice(list(SIZES)), "count": int(rng.integers(1, 4)),
            "region": rng.choice(list(REGIONS)), "bg": rng.choice(list(BACKGROUNDS))}


def _render(rng: np.random.Generator, sc: dict) -> np.ndarray:
    bg = np.array(BACKGROUNDS[sc["bg"]][0], np.float64)
    img = np.broadcast_to(bg, (INTERNAL, INTERNAL, 3)).copy()
    img += rng.normal(0.0, rng.uniform(0.0, 6.0), size=img.shape)  # slight background noise
    radius = SIZES[sc["size"]][0] * rng.uniform(0.9, 1.1)
    colour = np.array(COLOURS[sc["colour"]][0], np.float64) + rng.uniform(-15, 15, size=3)
    for cx, cy in _place(rng, REGIONS[sc["region"]][0], sc["count"], radius):
        # Only the object's bounding box is evaluated: ~10x faster than the whole image.
        x0, y0 = (max(0, int(c - 1.1 * radius) - 1) for c in (cx, cy))
        x1, y1 = (min(INTERNAL, int(c + 1.1 * radius) + 2) for c in (cx, cy))
        xs, ys = _G[x0 * SUPER:x1 * SUPER], _G[y0 * SUPER:y1 * SUPER]
        inside = _shape_mask(sc["shape"], (xs[None, :] - cx) / radius,
                             (ys[:, None] - cy) / radius)
        cover = inside.reshape(y1 - y0, SUPER, x1 - x0, SUPER).mean(axis=(1, 3))[..., None]
        img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1.0 - cover) + colour * cover
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _caption(rng: np.random.Generator, sc: dict) -> str:
    count = sc["count"]
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731
    shape = pick(SHAPES[sc["shape"]])[0 if count == 1 else 1]
    text = pick(TEMPLATES).format(
        count=pick(COUNTS[count]), size=pick(SIZES[sc["size"]][1]),
        colour=pick(COLOURS[sc["colour"]][1]), shape=shape,
        region=pick(REGIONS[sc["region"]][1]), label=pick(REGIONS[sc["region"]][2]),
        bg=pick(BACKGROUNDS[sc["bg"]][1]), be="is" if count == 1 else "are")
    text = re.sub(r"\ba ([aeiou])", r"an \1", text)  # "a amber" -> "an amber"
    return text[0].upper() + text[1:] + "."


def _captions(rng: np.random.Generator, sc: dict, k: int) -> list[str]:
    """k paraphrases, distinct whenever the template space allows (it nearly always does)."""
    out: list[str] = []
    for _ in range(50 * k):
        if len(out) == k:
            break
        cap = _caption(rng, sc)
        if cap not in out:
            out.append(cap)
    while len(out) < k:
        out.append(_caption(rng, sc))
    return out


def generate(n_train: int, n_val: int, n_test: int, captions_per_image: int,
             resolution: int, seed: int):
    """Images uint8 [N, resolution, resolution, 3], captions (one list per image), splits.

    The split is by index: first n_train train, then n_val val, then n_test test.
    """
    n = n_train + n_val + n_test
    images = np.empty((n, resolution, resolution, 3), np.uint8)
    captions, splits = [], ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    for i in range(n):
        rng = np.random.default_rng([int(seed), i])  # per-image stream: independent of n
        sc = _scene(rng)
        img = _render(rng, sc)
        if resolution != INTERNAL:
            img = np.asarray(Image.fromarray(img).resize((resolution, resolution),
                                                         Image.BICUBIC))
        images[i] = img
        captions.append(_captions(rng, sc, captions_per_image))
    return images, captions, splits
