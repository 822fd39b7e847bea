"""shortcut_expert: an expert trajectory straightened into PTM-ST's shortcut trajectory.

PTM-ST (arXiv 2603.25388) matches the students against "convexified" expert trajectories:
over a window of epochs [a, b], every parameter tensor moves on the straight line from where
it was at epoch a to where it is at epoch b, at its own recorded cumulative speed
(vldd.trajectory.straighten). The output is an expert trajectory of its own (schema
vldd/trajectory, b - a epochs, float32 rows, the window's metrics) with the source's
provenance and `shortcut_of` / `shortcut_window`, so distill reads it as any expert:
distill.shortcut [a, b] points the distill rule at these files.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .. import trajectory
from ..errors import VlddError
from ..io import h5_writer
from ..trajectory import GROUPS, Trajectory

# float32 rows without offsets: the ends are the source's rows exactly
STORAGE = {"dtype": "float32", "compression": "gzip", "offsets": False}


def shortcut_expert(expert_path, window, out_path) -> None:
    """Write the shortcut of epochs window = (a, b) of the expert at expert_path."""
    a, b = (int(v) for v in window)
    t = Trajectory(expert_path)
    try:
        if not 0 <= a < b <= t.n_epochs:
            raise VlddError(f"{expert_path}: shortcut window [{a}, {b}] is not inside the "
                            f"expert's epochs 0..{t.n_epochs}; set distill.shortcut to "
                            f"[a, b] with 0 <= a < b <= experts.epochs.")
        epochs = list(range(a, b + 1))
        rows = {g: trajectory.straighten(torch.stack(t.rows(g, *epochs)), t.layouts[g])
                for g in GROUPS}
        loss = np.asarray(t.file["metrics"]["loss"][a:b])
        val = np.asarray(t.file["metrics"]["val"][a:b])
        attrs = {k: v for k, v in t.attrs.items()
                 if not k.startswith("params_")}
        attrs.update(n_epochs=b - a, shortcut_of=str(Path(expert_path).name),
                     shortcut_window=json.dumps([a, b]))
    finally:
        t.close()
    with h5_writer(out_path, attrs) as f:
        trajectory.create(f, t.layouts, b - a, STORAGE)
        for e in range(b - a + 1):
            trajectory.write_row(f, e, {g: rows[g][e] for g in GROUPS})
        f["metrics"]["loss"][...] = loss
        f["metrics"]["val"][...] = val
