"""PTM-ST's phased distillation (arXiv 2603.25388; distill.phases).

The distilled pairs are split into subsets distilled one after the other, each against its
own teacher window: its shortcut trajectories, its start epochs and its iterations (PTM-ST at
500 Flickr30K pairs: 200 pairs against epochs 0-6 from starts in [0, 2), then 299 against
epochs 0-8 from starts in [1, 3)). The pair set keeps each pair's phase, its lrs and its block
of S, and evaluate trains one model on the subsets in that order (PTM-ST's evaluator), each
with its own learned lrs and its own similarity block.

distill.phases null is one phase: the run as without phases, bit for bit.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .config import WITHOUT_EXPERTS, algorithm
from .errors import VlddError
from .io import open_h5
from .outer import pairs_to_distil
from .pairset import PairSet


@dataclass
class Phase:
    index: int
    cfg: dict          # the distill settings the phase runs (distill.phases dropped)
    budget: int        # what its Distiller is given: the budget, or the phase's pairs
    experts: list      # the expert files it matches
    checkpoint: Path   # its checkpoint (kept until the whole pair set is written)


def phase_seed(seed: int, index: int) -> int:
    """Phase 0 keeps distill.seed; a later phase draws from a stream of (seed, index), so
    that no phase repeats another's draws, nor another seed's."""
    if index == 0:
        return int(seed)
    state = np.random.SeedSequence([abs(int(seed)), int(seed < 0), index]).generate_state(1)
    return int(state[0] >> 1)


def split(total: int, shares) -> list[int]:
    """`total` pairs in proportion to `shares`, largest remainders first."""
    w = np.asarray(shares, dtype=np.float64)
    want = w / w.sum() * total
    counts = np.floor(want).astype(np.int64)
    for i in np.argsort(-(want - counts), kind="stable")[:total - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]


def window_of(path):
    """The shortcut window [a, b] of an expert file, or None for a trajectory as trained."""
    with open_h5(path, "trajectory") as f:
        window = f.attrs.get("shortcut_window")
    return None if window is None else [int(v) for v in json.loads(window)]


def phase_checkpoint(checkpoint, index: int) -> Path:
    """pairs.h5.ckpt.h5 -> pairs.h5.ckpt.phase<index>.h5"""
    checkpoint = Path(checkpoint)
    return checkpoint.with_name(f"{checkpoint.name.removesuffix('.h5')}.phase{index}.h5")


def plan(cfg, budget: int, expert_paths, checkpoint) -> list[Phase]:
    """The phases of a distillation: one (the settings as given) without distill.phases;
    else one per entry, its keys over distill's, its share of the pairs (a pair still pays
    for S once, with lors.pay_for_similarity), its seed and the experts of its window."""
    base = cfg.as_dict()
    if not base["phases"]:
        return [Phase(0, base, int(budget), list(expert_paths), Path(checkpoint))]
    entries = base["phases"]
    counts = split(pairs_to_distil(cfg, int(budget)), [e["share"] for e in entries])
    windows = {str(p): window_of(p) for p in expert_paths}
    out = []
    for i, (entry, n) in enumerate(zip(entries, counts)):
        if n < 2:
            raise VlddError(f"distill.phases: phase {i} gets {n} of the {sum(counts)} pairs of "
                            f"budget {budget}; every phase needs at least 2. Raise the budget "
                            "or the phase's share.")
        over = {k: v for k, v in entry.items() if k != "share"}
        pcfg = {**base, **over, "phases": None, "seed": phase_seed(base["seed"], i),
                "lors": {**base["lors"], "pay_for_similarity": False}}
        if pcfg["min_start_epoch"] >= pcfg["max_start_epoch"]:
            raise VlddError(f"distill.phases[{i}]: min_start_epoch {pcfg['min_start_epoch']} "
                            f">= max_start_epoch {pcfg['max_start_epoch']}: starts are drawn "
                            "from [min_start_epoch, max_start_epoch).")
        mine = [p for p in expert_paths if windows[str(p)] == pcfg["shortcut"]]
        if not mine and algorithm(base["method"]) not in WITHOUT_EXPERTS:
            what = (f"a shortcut trajectory of epochs {pcfg['shortcut']}" if pcfg["shortcut"]
                    else "a trajectory as trained (no shortcut)")
            raise VlddError(f"distill.phases[{i}] matches {what}, and none of the expert files "
                            f"given ({', '.join(Path(p).name for p in expert_paths) or 'none'}) "
                            "is one. Run it through the workflow (rule shortcut_expert makes "
                            "them) or pass those files to --experts.")
        out.append(Phase(i, pcfg, n, mine, phase_checkpoint(checkpoint, i)))
    return out


def merge(parts: list[PairSet], budget: int) -> PairSet:
    """The pair set of a distillation from its phases' (one phase: its own): the phases'
    pairs in order, each pair's phase, each phase's lrs (the last phase's are the set's own,
    as its selected_iteration, counted within that phase) and S as the block-diagonal matrix
    of the phases' (the identity block for a phase without one)."""
    if len(parts) == 1:
        return parts[0]
    counts = [len(p.images) for p in parts]
    cat = (lambda name: None if getattr(parts[0], name) is None
           else np.concatenate([getattr(p, name) for p in parts]))
    similarity = None
    with_s = [p for p in parts if p.similarity is not None]
    if with_s:
        matrix = np.zeros((sum(counts), sum(counts)), dtype=np.float32)
        at = 0
        for p, n in zip(parts, counts):
            s = p.similarity_matrix()
            matrix[at:at + n, at:at + n] = np.eye(n, dtype=np.float32) if s is None else s
            at += n
        similarity = {"kind": "full", "alpha": with_s[0].similarity["alpha"],
                      "arrays": {"matrix": matrix}}
    last = parts[-1]
    return PairSet(cat("images"), cat("texts"), cat("caption_ids"), kind=last.kind,
                   method=last.method, mean=last.mean, std=last.std, lr_image=last.lr_image,
                   lr_text=last.lr_text, init_images=cat("init_images"),
                   init_texts=cat("init_texts"),
                   attrs={"selected_iteration": last.attrs["selected_iteration"]},
                   nominal_budget=int(budget), similarity=similarity,
                   phases=np.repeat(np.arange(len(parts)), counts),
                   phase_lrs=np.asarray([[p.lr_image, p.lr_text] for p in parts]))


def join_curves(curves: list[pd.DataFrame]) -> pd.DataFrame:
    """The curve of a distillation from its phases' (one phase: its own): one after the
    other with a `phase` column, the iterations counted on."""
    if len(curves) == 1:
        return curves[0]
    out, offset = [], 0
    for i, c in enumerate(curves):
        out.append(c.assign(phase=i, iteration=c["iteration"] + offset))
        offset += len(c)
    return pd.concat(out, ignore_index=True)


def parts(ps: PairSet):
    """What evaluate trains on, in order: (pair ids, (lr_image, lr_text) as stored, S's block
    or None where it is the identity) per phase; one part for a set without phases."""
    s = ps.similarity_matrix()
    phases = np.zeros(len(ps.images), np.int64) if ps.phases is None else ps.phases
    lrs = [[ps.lr_image, ps.lr_text]] if ps.phase_lrs is None else ps.phase_lrs
    out = []
    for i, (lr_image, lr_text) in enumerate(lrs):
        ids = np.flatnonzero(phases == i)
        block = None if s is None else s[np.ix_(ids, ids)]
        if block is not None and np.array_equal(block, np.eye(len(ids), dtype=block.dtype)):
            block = None
        out.append((ids, (float(lr_image), float(lr_text)), block))
    return out
