"""Coreset baselines (random, herding, k-center, forgetting) on the tiny prepared store."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from vldd.stages.select_coreset import KINDS, Pool, cover_radius, forgetting_counts, herding, kcenter, matched_in_batch, mean_error, most_forgotten, pair_embedding, select_coreset
from vldd.pairset import random_pairs
from vldd.prepared import load_prepared
from vldd.prepared import load_embeddings
from vldd.encoders import build_image_encoder, image_normalisation, to_model_input
from vldd.errors import VlddError
from vldd.pairset import read_pairset

from conftest import EXPERTS, MODEL

# The forgetting run in these tests: every caption every epoch, so that every pair is
# presented often enough to be learned and forgotten.
FORGET = {**EXPERTS, "epochs": 6, "sample": "captions", "batch_size": 6}


def _select(store, kind, budget, out, seed=0, model=MODEL):
    select_coreset(store / "data", store / "emb.h5", model, kind, budget, seed, out,
                   expert_path=store / "expert_0.h5", experts_cfg=FORGET, device="cpu")


@pytest.fixture(scope="module")
def pool(store):
    pool, _, _ = pair_embedding(store / "data", store / "emb.h5", MODEL, store / "expert_0.h5")
    return pool


def _positions(pool: Pool, caption_ids):
    where = {int(c): p for p, c in enumerate(pool.caption_ids)}
    return np.array([where[int(c)] for c in caption_ids])


@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_is_distinct_real_training_images_and_deterministic(store, tmp_path, kind):
    _select(store, kind, 6, tmp_path / "a.h5")
    _select(store, kind, 6, tmp_path / "b.h5")
    assert (tmp_path / "a.h5").read_bytes() == (tmp_path / "b.h5").read_bytes()
    ps = read_pairset(tmp_path / "a.h5")
    assert ps.kind == "coreset" and ps.method == kind and ps.budget == 6
    caps = pd.read_parquet(store / "data/captions.parquet").set_index("caption_id")
    assert set(caps.loc[ps.caption_ids, "split"]) == {"train"}
    images = caps.loc[ps.caption_ids, "image_index"].to_numpy()
    assert len(set(images)) == 6  # distinct images
    emb = load_embeddings(store / "emb.h5", store / "data")
    assert np.array_equal(ps.texts, emb[ps.caption_ids])  # real captions
    prepared = load_prepared(store / "data")
    expect = to_model_input(prepared.images[images], ps.mean, ps.std).numpy()
    assert np.array_equal(ps.images, expect)  # their own images
    assert np.isnan(ps.lr_image) and np.isnan(ps.lr_text)


def test_normalisation_comes_without_building_the_encoder():
    tower = build_image_encoder({**MODEL["image_encoder"], "trainable": "all"})
    assert image_normalisation(MODEL["image_encoder"]) == (tower.mean, tower.std)
    assert image_normalisation({"name": "nfnet_l0"}) == ((0.485, 0.456, 0.406),
                                                        (0.229, 0.224, 0.225))


def test_seeds_change_the_random_choices(store, tmp_path):
    for kind in ("random", "kcenter"):
        _select(store, kind, 6, tmp_path / "0.h5", seed=0)
        _select(store, kind, 6, tmp_path / "1.h5", seed=1)
        a, b = read_pairset(tmp_path / "0.h5"), read_pairset(tmp_path / "1.h5")
        assert not np.array_equal(a.caption_ids, b.caption_ids), kind


def test_joint_embedding_is_two_unit_halves(pool, store):
    caps = pd.read_parquet(store / "data/captions.parquet")
    train = caps[caps["split"] == "train"]
    assert np.array_equal(pool.caption_ids, train["caption_id"].to_numpy())
    assert np.array_equal(pool.image_ids, train["image_index"].to_numpy())
    half = pool.x.shape[1] // 2
    # the image half once per image in float32, the text half per pair in float16
    assert pool.img.dtype == torch.float32 and pool.txt.dtype == torch.float16
    assert len(pool.img) == len(np.unique(pool.image_ids)) and len(pool.txt) == len(pool)
    for part, tol in ((pool.x[:, :half], 1e-5), (pool.x[:, half:], 2e-3)):
        assert torch.allclose(part.norm(dim=1), torch.ones(len(part)), atol=tol)
    # Two captions of one image share the image half, not the text half.
    first = np.flatnonzero(pool.image_ids == pool.image_ids[0])
    assert len(first) == 2
    assert torch.equal(pool.x[first[0], :half], pool.x[first[1], :half])
    assert not torch.equal(pool.x[first[0], half:], pool.x[first[1], half:])


def _random_draws(store, pool, budget, seeds=range(11)):
    prepared = load_prepared(store / "data")
    return [_positions(pool, random_pairs(prepared, budget, s)) for s in seeds]


def test_herding_is_the_greedy_mean_matching_and_beats_random(store, pool):
    x = pool.x.double().numpy()
    mu = x.mean(0)
    for budget in (4, 8):
        chosen = herding(pool, budget)
        # The same greedy, by brute force: each step the available pair (of an unused image)
        # whose addition puts the running mean closest to the mean of all pairs.
        naive, used = [], set()
        for _ in range(budget):
            best, best_err = None, np.inf
            for p in range(len(x)):
                if pool.image_ids[p] in used:
                    continue
                err = np.linalg.norm(x[naive + [p]].mean(0) - mu)
                if err < best_err - 1e-9:
                    best, best_err = p, err
            naive.append(best)
            used.add(pool.image_ids[best])
        assert list(chosen) == naive
        ours = mean_error(pool, chosen)
        assert ours == pytest.approx(mean_error(pool.x, chosen), rel=1e-5)
        rand = [mean_error(pool.x, r) for r in _random_draws(store, pool, budget)]
        assert ours < np.median(rand), (ours, sorted(rand))


def test_kcenter_is_farthest_point_and_covers_better_than_random(store, pool):
    x = pool.x.double().numpy()
    for budget in (4, 12):
        chosen = kcenter(pool, budget, seed=0)
        assert chosen[0] == np.random.default_rng(0).integers(len(x))
        for k in range(1, budget):
            dist = np.linalg.norm(x[:, None] - x[chosen[:k]][None], axis=-1).min(1)
            open_ = ~np.isin(pool.image_ids, pool.image_ids[chosen[:k]])
            assert open_[chosen[k]]
            assert dist[chosen[k]] >= dist[open_].max() - 1e-5  # the farthest open pair
    # The covering radius: 48 pairs in a 2 x 1280-d space are nearly equidistant (pairwise
    # distances 0.5 to 1.3), so with a handful of centers farthest-point picks outliers and
    # does no better than random (on this store: N=4 gives 1.14 against a random median of
    # 1.10). Covering is its property once the centers are a fair share of the pool.
    for budget in (12, 16):
        for seed in (0, 1):
            chosen = kcenter(pool, budget, seed)
            ours = cover_radius(pool, chosen)
            assert ours == pytest.approx(cover_radius(pool.x, chosen), rel=1e-4)
            rand = [cover_radius(pool.x, r) for r in _random_draws(store, pool, budget)]
            assert ours < np.median(rand), (budget, seed, ours, sorted(rand))


def test_matched_means_both_directions_hit_the_own_image():
    # Four pairs; pairs 2 and 3 are two captions of one image (image 7).
    img = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 1]])
    txt = torch.tensor([[1.0, 0, 0], [1, 0.1, 0], [0, 0, 1], [0, 0.05, 1]])
    images = torch.tensor([4, 5, 7, 7])
    # Pair 0: image 0 retrieves caption 0 and caption 0 retrieves image 0: matched.
    # Pair 1: image 1 retrieves caption 1, but caption 1 retrieves image 0: not matched.
    # Pairs 2, 3: their images (both image 7) retrieve caption 2, a caption of image 7, and
    # captions 2 and 3 retrieve a row of image 7: matched.
    assert matched_in_batch(img, txt, images).tolist() == [True, False, True, True]
    # Image 0 now prefers caption 2 (another image): pair 0 is not matched.
    img[0] = torch.tensor([0.3, 0, 1])
    assert matched_in_batch(img, txt, images).tolist()[0] is False


@pytest.fixture(scope="module")
def forgetting(store):
    return forgetting_counts(store / "data", store / "emb.h5", MODEL, FORGET, 0, device="cpu")


def test_forgetting_counts_are_recorded(forgetting, pool):
    f = forgetting
    n = len(pool.caption_ids)
    assert np.array_equal(f.pool.caption_ids, pool.caption_ids)
    # sample=captions: every pair in every epoch (batches of 6 divide the 48 pairs).
    assert (f.presented == FORGET["epochs"]).all()
    assert (f.forgotten <= f.presented // 2).all()  # each forget follows a match
    assert (f.forgotten[~f.learned] == 0).all()
    # Not a degenerate run: some pairs forgotten, some never learned, some learned for good.
    assert f.forgotten.max() >= 1 and (~f.learned).any() and (f.score == 0).any()
    assert np.isinf(f.score[~f.learned]).all()
    assert len(f.score) == n


def test_forgetting_keeps_the_most_forgotten(forgetting, store, tmp_path):
    score = forgetting.score
    images = forgetting.pool.image_ids
    never = len(set(images[np.isinf(score)]))
    budget = never + 3  # past the never-learned pairs, into the counted ones
    assert budget < len(set(images))
    chosen = most_forgotten(forgetting, budget, seed=0)
    assert len(set(images[chosen])) == budget
    rest = ~np.isin(images, images[chosen])  # pairs of images not chosen
    assert np.isfinite(score[chosen]).any() and rest.any()
    assert score[chosen].min() >= score[rest].max()
    # Each chosen pair is its image's most forgotten caption.
    for p in chosen:
        assert score[p] == score[images == images[p]].max()
    # The stage writes exactly these pairs.
    _select(store, "forgetting", budget, tmp_path / "f.h5")
    ps = read_pairset(tmp_path / "f.h5")
    assert np.array_equal(ps.caption_ids, forgetting.pool.caption_ids[chosen])
    recorded = json.loads(ps.attrs["forgetting_score"])
    assert np.array_equal(np.asarray(recorded, dtype=float), score[chosen])


def test_forgetting_ties_follow_the_seed(forgetting):
    assert len(set(forgetting.pool.image_ids[np.isinf(forgetting.score)])) > 5
    a = most_forgotten(forgetting, 5, seed=0)
    b = most_forgotten(forgetting, 5, seed=1)
    assert np.isinf(forgetting.score[a]).all() and np.isinf(forgetting.score[b]).all()
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_budget_larger_than_the_training_set_names_the_budget(store, tmp_path, kind):
    with pytest.raises(VlddError, match=r"budget = 25 is larger than the training set \(24"):
        _select(store, kind, 25, tmp_path / "c.h5")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("kind", ["herding", "kcenter"])
def test_an_expert_of_another_model_is_refused(store, tmp_path, kind):
    other = {**MODEL, "image_encoder": {**MODEL["image_encoder"], "trainable": "last:2"}}
    with pytest.raises(VlddError, match="expert_0.h5: this expert was trained with another "
                                        "model.*last:1.*last:2"):
        _select(store, kind, 4, tmp_path / "c.h5", model=other)
    with pytest.raises(VlddError, match="needs|trained expert"):
        select_coreset(store / "data", store / "emb.h5", MODEL, kind, 4, 0, tmp_path / "c.h5")
    assert not list(tmp_path.iterdir())


def test_forgetting_without_the_experts_section_is_refused(store, tmp_path):
    with pytest.raises(VlddError, match="experts"):
        select_coreset(store / "data", store / "emb.h5", MODEL, "forgetting", 4, 0,
                       tmp_path / "c.h5")


def test_cli_selects_a_kcenter_coreset_with_an_expert(store, tmp_path):
    out = tmp_path / "c" / "pairs.h5"
    cmd = [sys.executable, "-m", "vldd", "--threads", "1", "select-coreset", "--config-json",
           json.dumps({"model": MODEL, "coresets": {"seed": 0}}), "--device", "cpu",
           "--data", str(store / "data"), "--embeddings", str(store / "emb.h5"),
           "--kind", "kcenter", "--experts", str(store / "expert_0.h5"), "--budget", "5",
           "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    _select(store, "kcenter", 5, tmp_path / "direct.h5")
    assert np.array_equal(read_pairset(out).caption_ids,
                          read_pairset(tmp_path / "direct.h5").caption_ids)
    cmd[cmd.index("--experts"):cmd.index("--experts") + 2] = []
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 2 and "--experts" in run.stderr


def test_dry_run_plans_every_kind_with_what_it_needs(tmp_path):
    from test_workflow import job_counts, snakemake

    out = snakemake(tmp_path, "-n", "-p", "--config",
                    "coresets={kinds: [random, herding, kcenter, forgetting]}")
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["select_coreset"] == 4 and counts["evaluate"] == 2 * (1 + 4)
    jobs = {}
    for block in text.split("rule select_coreset:")[1:]:
        kind = block.split("kind=")[1].split(",")[0]
        jobs[kind] = block.split("Shell command:")[1].split("\n")[0]
        has_expert = "experts/tiny-model/expert_0.h5" in block.split("output:")[0]
        assert has_expert == (kind in ("herding", "kcenter")), kind
    assert set(jobs) == set(KINDS)
    for kind, cmd in jobs.items():
        assert ("--experts" in cmd) == (kind in ("herding", "kcenter")), cmd
        assert ('"experts":' in cmd) == (kind == "forgetting"), cmd
