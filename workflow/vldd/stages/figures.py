"""figures: the paper's pictures from the artifacts (matplotlib only, no torch).

- examples: distilled images before and after distillation, each with the real training
  caption nearest (cosine) to its text embedding before and after (the seed's "distilled
  examples" figure);
- curve: the matching loss and the learned lrs over the distillation iterations;
- recall against budget, per method (mean +- std over evaluation seeds).
"""
from __future__ import annotations

import textwrap

import numpy as np
import pandas as pd

from ..errors import VlddError
from ..io import atomic_path, open_h5
from ..pairset import read_pairset


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path):
    with atomic_path(path) as tmp:
        # metadata without the date or version, so that equal data give equal bytes
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)


def _pixels(x, mean, std):
    """[3,H,W] normalised -> [H,W,3] in [0, 1]."""
    img = x * np.asarray(std, dtype=np.float32)[:, None, None] + \
        np.asarray(mean, dtype=np.float32)[:, None, None]
    return np.clip(img.transpose(1, 2, 0), 0.0, 1.0)


def nearest_captions(queries, data_dir, embeddings_path):
    """For each query embedding, the training caption whose embedding is nearest (cosine)."""
    caps = pd.read_parquet(f"{data_dir}/captions.parquet")
    train = caps[caps["split"] == "train"]
    with open_h5(embeddings_path, "embeddings") as f:
        emb = f["embeddings"][()]
    bank = emb[train["caption_id"].to_numpy()].astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True) + 1e-12
    q = np.asarray(queries, dtype=np.float32)
    q = q / (np.linalg.norm(q, axis=1, keepdims=True) + 1e-12)
    best = (q @ bank.T).argmax(axis=1)
    return list(train["caption"].to_numpy()[best])


def examples_figure(pairs_path, data_dir, embeddings_path, out_path, n_show=8):
    ps = read_pairset(pairs_path)
    if ps.init_images is None:
        raise VlddError(f"{pairs_path}: no initial images stored (not a distilled set?).")
    k = min(n_show, len(ps.images))
    before = nearest_captions(ps.init_texts[:k], data_dir, embeddings_path)
    after = nearest_captions(ps.texts[:k], data_dir, embeddings_path)
    plt = _plt()
    fig, axes = plt.subplots(2, k, figsize=(2.2 * k, 5.2), squeeze=False)
    for i in range(k):
        for row, (imgs, caps, label) in enumerate(((ps.init_images, before, "before"),
                                                    (ps.images, after, "after"))):
            ax = axes[row][i]
            ax.imshow(_pixels(imgs[i], ps.mean, ps.std), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("\n".join(textwrap.wrap(str(caps[i]), 22)[:4]), fontsize=7)
            if i == 0:
                ax.set_ylabel(label)
    fig.suptitle(f"{ps.method}, {ps.budget} pairs: images and nearest training caption of the "
                 "text embedding, before and after distillation", fontsize=9)
    _save(fig, out_path)


def curve_figure(curve_path, out_path):
    curve = pd.read_parquet(curve_path)
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.4))
    ax1.plot(curve["iteration"], curve["matching_loss"], lw=0.8, alpha=0.5, label="per iteration")
    window = max(1, len(curve) // 20)
    smooth = curve["matching_loss"].rolling(window, min_periods=1).mean()
    ax1.plot(curve["iteration"], smooth, lw=1.6, label="running mean")
    for term in ("term_image", "term_text"):   # each encoder's term (older curves lack them)
        if term in curve and curve[term].notna().any():
            ax1.plot(curve["iteration"], curve[term].rolling(window, min_periods=1).mean(),
                     lw=1.0, ls="--", label=term.replace("term_", "") + " term, running mean")
    ax1.set_xlabel("iteration")
    ax1.set_ylabel("matching loss")
    ax1.legend(fontsize=8)
    ax2.plot(curve["iteration"], curve["lr_image"], label="lr image")
    ax2.plot(curve["iteration"], curve["lr_text"], label="lr text")
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("learned student lr")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)


def recall_figure(table_path, out_path):
    long = pd.read_parquet(table_path)
    sub = long[long["method"] != "full"]
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    for ax, metric in zip(axes, ("TR@1", "IR@1")):
        for method, grp in sorted(sub[sub["metric"] == metric].groupby("method")):
            stats = grp.groupby("budget")["value"].agg(["mean", "std"]).reset_index()
            ax.errorbar(stats["budget"], stats["mean"], yerr=stats["std"].fillna(0), marker="o",
                        capsize=3, label=method)
        full = long[(long["method"] == "full") & (long["metric"] == metric)]["value"]
        if len(full):
            ax.axhline(full.mean(), color="k", ls="--", lw=1, label="full data")
        ax.set_xscale("log")
        ax.set_xlabel("pairs")
        ax.set_title(metric)
    axes[0].set_ylabel("recall (%)")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    _save(fig, out_path)
