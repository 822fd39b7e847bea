"""select_coreset: N real training pairs chosen by a rule, written as a pair set.

The paper's four baselines (R, H, K, F), adapted to image-caption pairs:

- random: N distinct training images, one of its captions each, uniformly at random.
- herding (Welling 2009, the greedy running-mean form of iCaRL): add, at each step, the pair
  that brings the mean of the selected pairs closest to the mean of all training pairs.
- kcenter (greedy farthest point, Sener & Savarese 2018): start from a seeded random pair,
  then repeatedly add the pair farthest from its nearest selected pair.
- forgetting (Toneva et al. 2019): train a model on the full data as an expert is trained,
  count for each pair how often it goes from matched to unmatched between consecutive
  presentations, keep the most forgotten (never-learned pairs first).

herding and kcenter work in a joint embedding of each pair from a trained expert (its final
parameters): [L2(image feature); L2(text feature)], the image through the expert's image
encoder, the caption's sentence embedding through its text head. Every kind chooses among all
training pairs (every caption of every image), but never two pairs of the same image: once a
pair is chosen, the other captions of its image are no longer candidates. config/README.md
(`coresets`) states each choice.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from .. import config
from ..encoders import image_normalisation
from ..errors import VlddError
from ..experts import data_fingerprint, load_expert_model
from ..io import config_hash, provenance
from ..model import build_model, embed_pairs, logit_scale, resolve_device
from ..pairset import PairSet, check_budget, random_pairs, write_pairset
from ..pool import Pool
from ..prepared import load_embeddings, load_prepared
from ..progress import Progress
from ..realdata import RealData, real_pairs, train_on_real

log = logging.getLogger(__name__)

KINDS = ("random", "herding", "kcenter", "forgetting")
NEEDS_EXPERT = config.CORESET_NEEDS_EXPERT


# ----------------------------------------------------------------------------- the pool


def _real_data(prepared, emb, model, device):
    data = RealData(prepared, emb, model, "train", device)
    image_ids = np.asarray(data.image_ids)[data.pair_img.numpy()]
    return data, Pool(np.asarray(data.caption_ids, dtype=np.int64), image_ids.astype(np.int64))


def pair_embedding(data_dir, embeddings_path, model_cfg, expert_path, device="cpu",
                   loaded=None):
    """(Pool with its joint embedding, the expert model, its provenance) for every training
    pair: x[p] = [L2(tail(trunk(image))); L2(head(text))] with the expert's final parameters,
    in eval mode (no dropout), on `device` (vldd.pool keeps the image half per image and the
    text half in float16). Every row has norm sqrt(2), to float16's rounding."""
    dev = resolve_device(device)
    prepared, emb = loaded or _load(data_dir, embeddings_path, model_cfg)
    model, attrs = load_expert_model(expert_path, model_cfg, emb.shape[1], data_dir,
                                     embeddings_path, dev)
    data, pool = _real_data(prepared, emb, model, dev)
    pool.img, pool.txt = embed_pairs(model, data.feats, data.texts, text_dtype=torch.float16)
    pool.pair_row = data.pair_img.to(pool.img.device)
    return pool, model, attrs


# ----------------------------------------------------------------------------- selection


def _take(pool: Pool, p: int, available: torch.Tensor):
    """Mark pair p's image as used: none of its pairs is a candidate any more."""
    available[torch.as_tensor(pool.image_ids == pool.image_ids[p])] = False


def herding(pool: Pool, budget: int) -> np.ndarray:
    """Pair indices chosen by greedy running-mean matching, in the order chosen.

    Step k adds the available pair p minimising |(S + x_p) / (k + 1) - mu|, S the sum of the
    k chosen pairs and mu the mean of all pairs; equivalently p minimises |x_p - t|^2 with
    t = (k + 1) mu - S. Ties go to the lowest pair index (no randomness).
    """
    mu = pool.total() / len(pool)
    sq = pool.sq()
    available = torch.ones(len(pool), dtype=torch.bool)
    total = torch.zeros_like(mu)
    chosen = []
    bar = Progress(budget, "herding", unit="pair", log=log)
    for k in range(budget):
        t = ((k + 1) * mu - total).float()
        score = sq - 2 * pool.matmul(t)
        score[~available.to(score.device)] = float("inf")
        p = int(torch.argmin(score))
        chosen.append(p)
        total += pool.rows([p])[0].double()
        _take(pool, p, available)
        bar.update(1)
    return np.asarray(chosen, dtype=np.int64)


def kcenter(pool: Pool, budget: int, seed: int) -> np.ndarray:
    """Pair indices chosen by greedy farthest-point (k-center) selection, in the order chosen.

    The first pair is drawn uniformly among all training pairs with `seed`; each next one is
    the available pair whose Euclidean distance to its nearest chosen pair is largest (ties:
    the lowest pair index).
    """
    sq = pool.sq()
    available = torch.ones(len(pool), dtype=torch.bool)
    nearest = torch.full((len(pool),), float("inf"), device=sq.device)
    p = int(np.random.default_rng(seed).integers(len(pool)))
    chosen = []
    bar = Progress(budget, "kcenter", unit="pair", log=log)
    for _ in range(budget):
        chosen.append(p)
        _take(pool, p, available)
        d2 = (sq + sq[p] - 2 * pool.matmul(pool.rows([p])[0])).clamp_min(0)
        nearest = torch.minimum(nearest, d2)
        score = nearest.clone()
        score[~available.to(score.device)] = -1.0
        p = int(torch.argmax(score))
        bar.update(1)
    return np.asarray(chosen, dtype=np.int64)


def mean_error(x, chosen) -> float:
    """|mean of the chosen rows - mean of all rows| (Euclidean) of a Pool's joint embedding
    or of a matrix."""
    if isinstance(x, Pool):
        sel, mean = x.rows(chosen).sum(0, dtype=torch.float64), x.total() / len(x)
    else:
        sel = x[torch.as_tensor(chosen, device=x.device)].sum(0, dtype=torch.float64)
        mean = x.sum(0, dtype=torch.float64) / len(x)
    return float((sel / len(chosen) - mean).norm())


def cover_radius(x, chosen) -> float:
    """max over all rows of the distance to the nearest chosen row (a Pool's joint embedding
    or a matrix)."""
    if isinstance(x, Pool):
        c = x.rows(chosen)
        d2 = x.sq()[:, None] + c.pow(2).sum(1)[None] - 2 * x.matmul(c.t())
        return float(d2.clamp_min(0).min(1).values.max().sqrt())
    x = x.float()
    return float(torch.cdist(x, x[torch.as_tensor(chosen, device=x.device)]).min(1).values.max())


# ----------------------------------------------------------------------------- forgetting


@dataclass
class Forgetting:
    """Per training pair (the Pool's order): how training on the full data treated it.

    presented: presentations (batches it was in); learned: matched at least once;
    forgotten: matched -> unmatched transitions between consecutive presentations.
    """
    pool: Pool
    presented: np.ndarray
    learned: np.ndarray
    forgotten: np.ndarray

    @property
    def score(self) -> np.ndarray:
        """The ranking key, higher = more forgotten: the forgetting count; +inf for a pair
        presented but never matched (never learned, Toneva's convention); -1 for a pair never
        presented (no evidence, ranked last; only with experts.sample = images)."""
        s = self.forgotten.astype(np.float64)
        s[(self.presented > 0) & ~self.learned] = np.inf
        s[self.presented == 0] = -1.0
        return s


def matched_in_batch(img_f, txt_f, images) -> torch.Tensor:
    """Which pairs of a batch are matched: in the batch's cosine similarity matrix (row i:
    pair i's image against every caption of the batch), pair i is matched when the argmax of
    row i is a caption of its own image AND the argmax of column i (its caption against every
    image of the batch) is its own image. `images`: the image of each pair of the batch (a
    batch may hold two captions of one image; either counts, as in retrieval)."""
    import torch.nn.functional as F

    img = F.normalize(img_f.float(), dim=-1)
    txt = F.normalize(txt_f.float(), dim=-1)
    sim = img @ txt.t()
    images = images.to(sim.device)
    return ((images[sim.argmax(1)] == images) & (images[sim.argmax(0)] == images)).cpu()


def forgetting_counts(data_dir, embeddings_path, model_cfg, experts_cfg, seed,
                      device="cpu", loaded=None) -> Forgetting:
    """Train one model on all training pairs with the settings of an `experts` section
    (epochs, lrs, momentum, weight decay, batch size, sample) from `seed`, recording at every
    batch which pairs are matched (matched_in_batch, on the features of the training forward
    pass: before the step, dropout on)."""

    dev = resolve_device(device)
    cfg = config.section("experts", experts_cfg)
    prepared, emb = loaded or _load(data_dir, embeddings_path, model_cfg)
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    data, pool = _real_data(prepared, emb, model, dev)
    n = len(pool.caption_ids)
    presented = np.zeros(n, dtype=np.int64)
    learned = np.zeros(n, dtype=bool)
    forgotten = np.zeros(n, dtype=np.int64)
    last = np.zeros(n, dtype=bool)  # matched at the previous presentation

    def on_batch(ids, img_f, txt_f):
        ids = torch.as_tensor(ids).cpu()
        now = matched_in_batch(img_f, txt_f, data.pair_img[ids]).numpy()
        ids = ids.numpy()
        forgotten[ids] += (last[ids] & ~now & (presented[ids] > 0))
        learned[ids] |= now
        last[ids] = now
        presented[ids] += 1

    train_on_real(model, data, model_cfg, cfg, int(seed), on_batch=on_batch,
                  progress="forgetting")
    log.info("forgetting: %d pairs, %d never presented, %d never learned, max count %d",
             n, int((presented == 0).sum()), int(((presented > 0) & ~learned).sum()),
             int(forgotten.max(initial=0)))
    return Forgetting(pool, presented, learned, forgotten)


def most_forgotten(stats: Forgetting, budget: int, seed: int) -> np.ndarray:
    """Pair indices of the `budget` most forgotten pairs of distinct images: pairs in order of
    decreasing score, ties in a random order from `seed`, skipping pairs of an image already
    chosen."""
    score = stats.score
    tie = np.random.default_rng(seed).permutation(len(score))
    order = np.lexsort((tie, -score))
    chosen, used = [], set()
    for p in order:
        img = int(stats.pool.image_ids[p])
        if img in used:
            continue
        used.add(img)
        chosen.append(int(p))
        if len(chosen) == budget:
            break
    return np.asarray(chosen, dtype=np.int64)


# ----------------------------------------------------------------------------- the stage


def _load(data_dir, embeddings_path, model_cfg):
    return (load_prepared(data_dir),
            load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"]))


def _check_request(kind, expert_path, experts_cfg):
    if kind not in KINDS:
        raise VlddError(f"coreset kind '{kind}' is not known: choose one of {KINDS}.")
    if kind in NEEDS_EXPERT and expert_path is None:
        raise VlddError(f"coreset kind '{kind}' embeds the pairs with a trained expert: give "
                        "its trajectory (--experts PATH).")
    if kind == "forgetting" and not experts_cfg:
        raise VlddError("coreset kind 'forgetting' trains with the settings of the `experts` "
                        "section: give it in --config-json.")


def select_coreset(data_dir, embeddings_path, model, kind, budget, seed, out_path, *,
                   expert_path=None, experts_cfg=None, device="auto"):
    """Write the pair set of coreset `kind` with `budget` pairs.

    model: the model section (vldd.config's typed object, or a dict); expert_path: the
    trajectory whose final parameters embed the pairs (herding, kcenter); experts_cfg: the
    `experts` section whose training settings the forgetting run uses.
    """
    _check_request(kind, expert_path, experts_cfg)
    model_cfg = config.section("model", model).as_dict()
    budget, seed = int(budget), int(seed)
    prepared, emb = _load(data_dir, embeddings_path, model_cfg)
    check_budget(prepared, budget)
    section = {"model": model_cfg, "kind": kind, "budget": budget, "seed": seed}
    extra = {}
    if kind == "random":
        mean, std = image_normalisation(model_cfg["image_encoder"])
        ids = random_pairs(prepared, budget, seed)
    elif kind in NEEDS_EXPERT:
        pool, expert, extra = pair_embedding(data_dir, embeddings_path, model_cfg, expert_path,
                                             device, loaded=(prepared, emb))
        mean, std = expert.tower.mean, expert.tower.std
        chosen = herding(pool, budget) if kind == "herding" else kcenter(pool, budget, seed)
        extra["mean_error"] = mean_error(pool, chosen)
        extra["cover_radius"] = cover_radius(pool, chosen)
        log.info("%s: mean error %.4f, cover radius %.4f", kind, extra["mean_error"],
                 extra["cover_radius"])
        ids = pool.caption_ids[chosen]
    else:
        experts_cfg = config.section("experts", experts_cfg)
        section["experts"] = experts_cfg.as_dict()
        stats = forgetting_counts(data_dir, embeddings_path, model_cfg, experts_cfg, seed,
                                  device, loaded=(prepared, emb))
        mean, std = image_normalisation(model_cfg["image_encoder"])
        chosen = most_forgotten(stats, budget, seed)
        extra["forgetting_score"] = [float(s) for s in stats.score[chosen]]
        ids = stats.pool.caption_ids[chosen]
    ids = np.asarray(ids, dtype=np.int64)
    images, texts = real_pairs(prepared, emb, ids, mean, std)
    ps = PairSet(images, texts, ids, kind="coreset", method=kind, mean=mean, std=std)
    extra["data_sha256"] = config_hash(data_fingerprint(data_dir, embeddings_path))
    write_pairset(out_path, ps, provenance("pairset", section, seed=seed, **extra))
