"""PTM-ST's parts: shortcut trajectories (vldd.trajectory.straighten, the shortcut_expert
stage and rule) and the moving average of the distilled tensors (distill.ema: see
test_optimiser)."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from vldd.errors import VlddError
from vldd.stages.distill import Distiller
from vldd.stages.shortcut_expert import shortcut_expert
from vldd.trajectory import ParamLayout, Trajectory, straighten

from conftest import DISTILL, MODEL, straight_and_resumed  # and the `store` fixture
from test_workflow import TINY, job_counts, snakemake


def test_a_shortcut_keeps_each_layers_ends_and_is_a_straight_line_at_its_own_speed():
    gen = torch.Generator().manual_seed(0)
    layout = ParamLayout(["a", "b", "frozen"], [(3, 2), (4,), (2,)])
    rows = torch.randn(6, layout.size, generator=gen).cumsum(0)       # a random walk
    rows[:, -2:] = rows[0, -2:]                                          # one never moves
    out = straighten(rows, layout)
    assert torch.equal(out[0], rows[0]) and torch.equal(out[-1], rows[-1])
    assert torch.equal(out[:, -2:], rows[:, -2:])
    start = 0
    for n in layout.numels[:2]:
        seg, orig = out[:, start:start + n].double(), rows[:, start:start + n].double()
        direction = seg[-1] - seg[0]
        beta = ((seg - seg[0]) @ direction) / direction.dot(direction)
        # on the line: every row is seg[0] + beta (seg[-1] - seg[0])
        assert torch.allclose(seg, seg[0] + beta[:, None] * direction, atol=1e-5)
        # at the layer's own cumulative speed
        steps = (orig[1:] - orig[:-1]).norm(dim=1)
        want = torch.cat([torch.zeros(1, dtype=steps.dtype), steps.cumsum(0) / steps.sum()])
        assert torch.allclose(beta, want, atol=1e-5)
        assert (beta.diff() >= 0).all()
        start += n
    # the two layers move at different speeds: per-layer betas, not one for all
    other = straighten(rows[:, :6].clone(), ParamLayout(["a"], [(3, 2)]))
    assert torch.equal(other, out[:, :6])


def test_the_shortcut_stage_writes_an_expert_that_distill_reads(store, tmp_path):
    src = store / "expert_0.h5"
    out = tmp_path / "shortcut_1_3" / "expert_0.h5"
    shortcut_expert(src, (1, 3), out)
    t, s = Trajectory(out), Trajectory(src)
    assert t.n_epochs == 2 and t.attrs["shortcut_window"] == "[1, 3]"
    for g in ("image", "text"):
        assert torch.equal(t.rows(g, 0)[0], s.rows(g, 1)[0])
        assert torch.equal(t.rows(g, 2)[0], s.rows(g, 3)[0])
        want = straighten(torch.stack(s.rows(g, 1, 2, 3)), s.layouts[g])[1]
        assert torch.equal(t.rows(g, 1)[0], want)
    assert np.array_equal(t.file["metrics"]["loss"][()], s.file["metrics"]["loss"][1:3])
    t.close()
    s.close()
    from test_results_layout import ARTIFACTS, check_h5    # the file is as documented
    check_h5(out, next(a for a in ARTIFACTS if "/shortcut_{a}_{b}/" in a.pattern))
    d = Distiller(store / "data", store / "emb.h5", [out], MODEL,
                  {**DISTILL, "shortcut": [1, 3], "max_start_epoch": 1, "expert_epochs": 2}, 6,
                  "cpu")
    d.iterate()
    assert np.isfinite(d.curve[-1][1])
    with pytest.raises(VlddError, match="expert_0.h5"):    # its 2 epochs are too few
        Distiller(store / "data", store / "emb.h5", [out], MODEL,
                  {**DISTILL, "max_start_epoch": 2, "expert_epochs": 2}, 6, "cpu")


def test_a_shortcut_window_outside_the_expert_is_one_clear_error(store, tmp_path):
    out = tmp_path / "s" / "expert_0.h5"
    got = subprocess.run([sys.executable, "-m", "vldd", "shortcut-expert", "--expert",
                          str(store / "expert_0.h5"), "--window", "1", "9", "--out", str(out)],
                         capture_output=True, text=True, timeout=300)
    assert got.returncode == 2
    lines = [x for x in got.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and "expert_0.h5" in lines[0] and "distill.shortcut" in lines[0]
    assert not out.exists()
    assert not (tmp_path / "s").exists() or not any((tmp_path / "s").iterdir())


def test_a_distillation_with_shortcut_plans_the_shortcut_jobs_and_uses_them(tmp_path):
    extra = tmp_path / "shortcut.yaml"
    extra.write_text(yaml.safe_dump({"distill": {
        "shortcut": [0, 3], "variants": {"plain": {"shortcut": None}}}}))
    out = snakemake(tmp_path, "-n", "-p", "--configfile", str(TINY), str(extra))
    counts = job_counts(out.stdout + out.stderr)
    assert counts["shortcut_expert"] == 2 and counts["distill"] == 2
    text = out.stdout + out.stderr
    assert "experts/tiny-model/shortcut_0_3/expert_1.h5" in text
    assert "--window 0 3" in text


def test_ptmst_with_shortcut_ema_and_a_full_similarity_resumes_to_identical_bytes(store,
                                                                                   tmp_path):
    from vldd.pairset import read_pairset

    expert = tmp_path / "shortcut_0_3" / "expert_0.h5"
    shortcut_expert(store / "expert_0.h5", (0, 3), expert)
    cfg = {**DISTILL, "method": "ptmst", "shortcut": [0, 3], "ema": 0.9,
           "max_start_epoch": 2, "expert_epochs": 1, "select": "best", "select_window": 1,
           "lors": {"similarity": "full", "lr_sim": 0.5}}
    straight, resumed = straight_and_resumed(store, [expert], MODEL, cfg, 7, tmp_path)
    ps = read_pairset(straight / "pairs.h5")
    assert ps.method == "ptmst" and len(ps.images) == 6 and ps.similarity_matrix().shape == (6, 6)
    for name in ("pairs.h5", "curve.parquet"):
        assert (resumed / name).read_bytes() == (straight / name).read_bytes(), name
