"""Tests for vldd.metrics: TR@K / IR@K on hand-built score matrices whose ranks are worked
out by hand (several captions per image, ties, images without captions, bad shapes)."""
from __future__ import annotations

import numpy as np
import pytest

from vldd.metrics import recall, retrieval_ranks

# 3 images; image 0 has captions t0,t1, image 1 has t2,t3,t4, image 2 has t5,t6.
TXT2IMG = np.array([0, 0, 1, 1, 1, 2, 2])
#                 t0    t1    t2    t3    t4    t5    t6
SCORES = np.array([
    [0.90, 0.10, 0.80, 0.20, 0.30, 0.40, 0.50],   # img0: best own 0.9 (t0), nothing above
    [0.70, 0.60, 0.10, 0.50, 0.20, 0.95, 0.30],   # img1: best own 0.5 (t3); t0, t1, t5 above
    [0.20, 0.30, 0.40, 0.60, 0.10, 0.35, 0.05],   # img2: best own 0.35 (t5); t2, t3 above
])
# By hand, TR: image ranks 0, 3, 2.
# IR, column by column (own image's score vs. the other two images):
#   t0 0.9 vs .7,.2 -> 0   t1 0.1 vs .6,.3 -> 2   t2 0.1 vs .8,.4 -> 2   t3 0.5 vs .2,.6 -> 1
#   t4 0.2 vs .3,.1 -> 1   t5 0.35 vs .4,.95 -> 2  t6 0.05 vs .5,.3 -> 2
TR_RANKS = [0, 3, 2]
IR_RANKS = [0, 2, 2, 1, 1, 2, 2]


def test_ranks_of_hand_built_matrix_with_several_captions_per_image():
    tr, ir = retrieval_ranks(SCORES, TXT2IMG)
    assert tr.tolist() == TR_RANKS
    assert ir.tolist() == IR_RANKS


def test_recall_of_hand_built_matrix():
    r = recall(SCORES, TXT2IMG)
    assert set(r) == {"TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"}
    assert r["TR@1"] == pytest.approx(100 / 3)      # only image 0 at rank 0
    assert r["TR@5"] == pytest.approx(100.0)
    assert r["TR@10"] == pytest.approx(100.0)
    assert r["IR@1"] == pytest.approx(100 / 7)      # only caption t0 at rank 0
    assert r["IR@5"] == pytest.approx(100.0)
    assert r["IR@10"] == pytest.approx(100.0)


def test_recall_custom_ks_uses_rank_below_k():
    r = recall(SCORES, TXT2IMG, ks=(2, 3))
    assert r == pytest.approx({"TR@2": 100 / 3, "TR@3": 200 / 3,     # ranks 0,3,2
                               "IR@2": 300 / 7, "IR@3": 100.0})      # ranks 0,2,2,1,1,2,2


def test_tr_at_5_and_10_on_larger_matrix_with_set_ranks():
    # 12 images x 2 captions; image i gets exactly RANKS[i] wrong captions above its best one.
    ranks = [0, 1, 4, 5, 9, 10, 15, 0, 3, 7, 20, 2]
    n_img, n_txt = 12, 24
    txt2img = np.repeat(np.arange(n_img), 2)
    scores = np.zeros((n_img, n_txt))
    for i, r in enumerate(ranks):
        own = np.flatnonzero(txt2img == i)
        others = np.flatnonzero(txt2img != i)
        scores[i, own] = [0.5, 0.2]
        scores[i, others[:r]] = 0.9
    tr, _ = retrieval_ranks(scores, txt2img)
    assert tr.tolist() == ranks
    out = recall(scores, txt2img)
    assert out["TR@1"] == pytest.approx(100 * 2 / 12)   # ranks 0, 0
    assert out["TR@5"] == pytest.approx(100 * 6 / 12)   # + 1, 4, 3, 2
    assert out["TR@10"] == pytest.approx(100 * 9 / 12)  # + 5, 9, 7


def test_ir_at_5_and_10_on_larger_matrix_with_set_ranks():
    # 12 images, 12 captions, caption t belongs to image (t * 5) % 12 (a permutation);
    # caption t gets exactly RANKS[t] wrong images above its own.
    ranks = [0, 11, 4, 5, 9, 10, 1, 0, 3, 7, 6, 2]
    n = 12
    txt2img = (np.arange(n) * 5) % n
    scores = np.zeros((n, n))
    for t, r in enumerate(ranks):
        others = [i for i in range(n) if i != txt2img[t]]
        scores[txt2img[t], t] = 0.5
        scores[others[:r], t] = 0.9
    _, ir = retrieval_ranks(scores, txt2img)
    assert ir.tolist() == ranks
    out = recall(scores, txt2img)
    assert out["IR@1"] == pytest.approx(100 * 2 / 12)
    assert out["IR@5"] == pytest.approx(100 * 6 / 12)   # 0, 4, 1, 0, 3, 2
    assert out["IR@10"] == pytest.approx(100 * 10 / 12)  # all but ranks 10, 11


def test_perfect_diagonal_gives_100_everywhere():
    assert all(v == 100.0 for v in recall(np.eye(5), np.arange(5)).values())
    # several captions per image: own captions 1, every other caption 0
    txt2img = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    scores = (txt2img[None, :] == np.arange(3)[:, None]).astype(float)
    assert all(v == 100.0 for v in recall(scores, txt2img).values())


def test_ties_count_against_the_model():
    # A collapsed model (all scores equal) must get 0 at K=1, not 100.
    txt2img = np.array([0, 0, 1, 1, 2, 2])
    tr, ir = retrieval_ranks(np.ones((3, 6)), txt2img)
    assert tr.tolist() == [4, 4, 4]          # all 4 foreign captions tie with the own ones
    assert ir.tolist() == [2] * 6            # both foreign images tie with the own one
    r = recall(np.ones((3, 6)), txt2img)
    assert r["TR@1"] == 0.0
    assert r["IR@1"] == 0.0
    # a single tie with a wrong candidate already loses rank 1
    s = np.eye(3)
    s[0, 1] = 1.0  # caption 1 (image 1's) scores as high for image 0 as image 0's own caption
    tr, ir = retrieval_ranks(s, np.arange(3))
    assert tr.tolist() == [1, 0, 0]
    assert ir.tolist() == [0, 1, 0]


def test_tr_hit_if_any_caption_in_top_k():
    # Each image has one caption at the top of its row and one at the very bottom.
    txt2img = np.array([0, 0, 1, 1])
    scores = np.array([[-1.0, 1.0, 0.0, 0.0],    # image 0: t0 last, t1 first
                       [0.0, 0.0, 1.0, -1.0]])   # image 1: t2 first, t3 last
    tr, ir = retrieval_ranks(scores, txt2img)
    assert tr.tolist() == [0, 0]
    assert recall(scores, txt2img)["TR@1"] == 100.0
    # the bottom captions are lost in the other direction
    assert ir.tolist() == [1, 0, 0, 1]
    assert recall(scores, txt2img)["IR@1"] == 50.0


def test_ir_averages_over_captions_tr_over_images():
    # image 0 has one caption, image 1 has three; image 0 retrieved both ways, image 1 never.
    txt2img = np.array([0, 1, 1, 1])
    scores = np.array([[1.0, 0.9, 0.9, 0.9],
                       [0.5, 0.1, 0.1, 0.1]])
    tr, ir = retrieval_ranks(scores, txt2img)
    assert tr.tolist() == [0, 1]
    assert ir.tolist() == [0, 1, 1, 1]
    r = recall(scores, txt2img)
    assert r["TR@1"] == pytest.approx(50.0)   # 1 of 2 images
    assert r["IR@1"] == pytest.approx(25.0)   # 1 of 4 captions (per image it would be 50)


def test_image_without_captions_is_never_retrieved():
    txt2img = np.array([0, 0, 1])   # image 2 has no caption
    scores = np.array([[1.0, 0.0, 0.0],
                       [0.0, 0.0, 1.0],
                       [5.0, 5.0, 5.0]])
    tr, _ = retrieval_ranks(scores, txt2img)
    assert tr[2] >= 10
    assert recall(scores, txt2img)["TR@10"] == pytest.approx(200 / 3)


@pytest.mark.parametrize("bad", [np.array([0, 1]), np.array([0, 1, 2, 0]),
                                 np.array([[0, 1, 2]])])
def test_wrong_txt2img_shape_raises(bad):
    with pytest.raises(ValueError, match="txt2img has shape"):
        retrieval_ranks(np.eye(3), bad)
