"""Tests for vldd.trajectory: write/read round trip of an expert trajectory, ParamLayout
(unflatten is exact and differentiable), layout checks and clear errors on bad files."""
from __future__ import annotations

import re

import h5py
import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.func import functional_call

from vldd import io, trajectory
from vldd.errors import VlddError
from vldd.trajectory import ParamLayout, Trajectory

N_EPOCHS = 3


def _modules():
    torch.manual_seed(0)
    return {"image": nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4)),
            "text": nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1))}


FLOAT32 = {"dtype": "float32", "compression": "none", "offsets": False}


def _write(path, modules, n_epochs=N_EPOCHS, seed=0):
    """Write a trajectory whose every row holds distinct random parameters; return the rows."""
    g = torch.Generator().manual_seed(seed)
    layouts = {k: ParamLayout.of(m) for k, m in modules.items()}
    attrs = io.provenance("trajectory", {"test": True}, n_epochs=n_epochs, lr_image=0.1,
                          lr_text=0.2)
    rows = []
    with io.h5_writer(path, attrs) as f:
        trajectory.create(f, layouts, n_epochs, FLOAT32)   # exact rows (the default is bf16)
        for epoch in range(n_epochs + 1):
            flats = {}
            for k, m in modules.items():
                with torch.no_grad():
                    for p in m.parameters():
                        p.copy_(torch.randn(p.shape, generator=g))
                flats[k] = trajectory.flatten(m.parameters())
            trajectory.write_row(f, epoch, flats)
            rows.append(flats)
    return rows


@pytest.fixture
def written(tmp_path):
    modules = _modules()
    path = tmp_path / "expert.h5"
    rows = _write(path, modules)
    return path, modules, rows


def test_round_trip_names_shapes_and_rows(written):
    path, modules, rows = written
    t = Trajectory(path)
    try:
        assert t.n_epochs == N_EPOCHS
        assert t.attrs["schema"] == "vldd/trajectory"
        assert t.attrs["lr_text"] == pytest.approx(0.2)
        assert t.layouts["image"].names == ["0.weight", "0.bias", "1.weight", "1.bias"]
        assert t.layouts["image"].shapes == [(4, 3), (4,), (4,), (4,)]
        assert t.layouts["text"].names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        assert t.layouts["text"].shapes == [(3, 2), (3,), (1, 3), (1,)]
        assert t.layouts["image"].size == 12 + 4 + 4 + 4
        for epoch in range(N_EPOCHS + 1):
            for group in ("image", "text"):
                got = t.params(group, epoch)
                assert got.dtype == torch.float32
                torch.testing.assert_close(got, rows[epoch][group], rtol=0, atol=0)
        # rows are distinct, so a reader returning the wrong row would fail above
        assert not torch.equal(rows[0]["image"], rows[1]["image"])
    finally:
        t.close()


def test_params_outside_recorded_epochs_raise(written):
    path, _, _ = written
    t = Trajectory(path)
    try:
        with pytest.raises(VlddError, match="epoch 4 not recorded"):
            t.params("image", N_EPOCHS + 1)
        with pytest.raises(VlddError, match="not recorded"):
            t.params("text", -1)
    finally:
        t.close()


def test_unflatten_gives_module_parameters(written):
    path, modules, rows = written
    t = Trajectory(path)
    try:
        parts = t.layouts["image"].unflatten(t.params("image", N_EPOCHS))
    finally:
        t.close()
    # the modules hold the last row written
    named = dict(modules["image"].named_parameters())
    assert list(parts) == list(named)
    for name, p in named.items():
        assert parts[name].shape == p.shape
        torch.testing.assert_close(parts[name], p.detach(), rtol=0, atol=0)


def test_unflatten_is_differentiable():
    module = _modules()["image"]
    layout = ParamLayout.of(module)
    flat = trajectory.flatten(module.parameters()).clone().requires_grad_(True)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))
    w = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    (functional_call(module, layout.unflatten(flat), (x,)) * w).sum().backward()
    # the same loss through the module's own parameters
    module.zero_grad()
    (module(x) * w).sum().backward()
    want = torch.cat([p.grad.reshape(-1) for p in module.parameters()])
    assert flat.grad is not None and flat.grad.abs().sum() > 0
    torch.testing.assert_close(flat.grad, want)


def test_layout_skips_frozen_parameters_and_counts_scalars():
    m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    m[0].requires_grad_(False)
    layout = ParamLayout.of(m)
    assert layout.names == ["1.weight", "1.bias"]
    scalar = ParamLayout(["s", "v"], [(), (3,)])
    assert scalar.numels == [1, 3] and scalar.size == 4
    parts = scalar.unflatten(torch.arange(4.0))
    assert parts["s"].shape == () and float(parts["s"]) == 0.0
    assert parts["v"].tolist() == [1.0, 2.0, 3.0]


def test_check_layout_accepts_same_module_rejects_other(written):
    path, _, _ = written
    t = Trajectory(path)
    try:
        t.check_layout("image", ParamLayout.of(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))))
        other_shape = ParamLayout.of(nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5)))
        with pytest.raises(VlddError, match="do not match the student"):
            t.check_layout("image", other_shape)
        other_names = ParamLayout.of(nn.Sequential(nn.Identity(), nn.Linear(3, 4),
                                                   nn.LayerNorm(4)))
        with pytest.raises(VlddError, match=re.escape(str(path))):
            t.check_layout("image", other_names)
        with pytest.raises(VlddError, match="text parameters"):
            t.check_layout("text", ParamLayout.of(nn.Linear(2, 1)))
    finally:
        t.close()


def test_truncated_file_raises_with_path(written):
    path, _, _ = written
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(VlddError, match=re.escape(str(path))):
        t = Trajectory(path)
        # should it open, reading every row must still fail clearly
        for epoch in range(N_EPOCHS + 1):
            t.params("image", epoch)
            t.params("text", epoch)


def test_missing_file_raises(tmp_path):
    with pytest.raises(VlddError, match="file not found"):
        Trajectory(tmp_path / "nope.h5")


def test_non_trajectory_hdf5_raises(tmp_path):
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(VlddError, match="expected vldd/trajectory"):
        Trajectory(plain)
    other = tmp_path / "pairs.h5"
    with io.h5_writer(other, io.provenance("pairset", {})) as f:
        f["x"] = np.arange(3)
    with pytest.raises(VlddError, match="holds vldd/pairset"):
        Trajectory(other)


def test_trajectory_schema_without_datasets_raises(tmp_path):
    path = tmp_path / "empty.h5"
    with io.h5_writer(path, io.provenance("trajectory", {}, n_epochs=2)):
        pass
    with pytest.raises(VlddError, match="incomplete or damaged"):
        Trajectory(path)


def test_epoch_count_disagreeing_with_rows_raises(tmp_path):
    modules = _modules()
    path = tmp_path / "expert.h5"
    _write(path, modules, n_epochs=2)
    with h5py.File(path, "a") as f:
        f.attrs["n_epochs"] = 5
    with pytest.raises(VlddError, match="params has shape"):
        Trajectory(path)


@pytest.mark.parametrize("offsets", [False, True])
@pytest.mark.parametrize("dtype,tol", [("float32", 0.0), ("float16", 1e-3), ("bfloat16", 8e-3)])
@pytest.mark.parametrize("compression", ["none", "gzip", "lzf"])
def test_storage_options_round_trip_within_their_precision(tmp_path, dtype, tol, compression,
                                                           offsets):
    import h5py
    import torch

    from vldd import trajectory
    from vldd.trajectory import ParamLayout, Trajectory

    layouts = {"image": ParamLayout(["w"], [(3, 5)]), "text": ParamLayout(["b"], [(7,)])}
    rows = {g: torch.randn(3, l.size, generator=torch.Generator().manual_seed(i)) * 3
            for i, (g, l) in enumerate(layouts.items())}
    path = tmp_path / f"t-{dtype}-{compression}.h5"
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "vldd/trajectory"
        f.attrs["n_epochs"] = 2
        trajectory.create(f, layouts, 2, {"dtype": dtype, "compression": compression,
                                          "offsets": offsets})
        for e in range(3):
            trajectory.write_row(f, e, {g: rows[g][e] for g in rows})
    t = Trajectory(path)
    if offsets:  # base + offset is float32 arithmetic: exact to float32 rounding
        tol = max(tol, 1e-6)
    for g in rows:
        for e in range(3):
            got = t.params(g, e)
            assert got.dtype == torch.float32
            # offsets are rounded relative to their own size, |theta_e - theta_0|
            scale = rows[g][e].abs() + (rows[g][0].abs() if offsets else 0)
            rel = ((got - rows[g][e]).abs() / scale.clamp(min=1e-3)).max().item()
            assert rel <= tol, (g, e, rel)
    with h5py.File(path) as f:
        expected = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}[dtype]
        assert f["image/params"].dtype == expected
        assert f["image/params"].compression == (None if compression == "none" else compression)
        assert ("base" in f["image"]) == offsets
    t.close()


def _drifting_rows(n_epochs=10, size=4000, drift=1e-3):
    """Parameters of order 1 that move by about `drift` per epoch, as a pretrained encoder
    fine-tuned at a small lr: the epoch differences are tiny next to the values."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(size, generator=g)
    steps = torch.randn(n_epochs, size, generator=g) * drift
    return torch.cat([base[None], base + steps.cumsum(0)])


def _stored(path, rows, storage):
    layouts = {"image": ParamLayout(["w"], [(rows.shape[1],)]), "text": ParamLayout(["b"], [(2,)])}
    with h5py.File(path, "w") as f:
        f.attrs["schema"] = "vldd/trajectory"
        f.attrs["n_epochs"] = len(rows) - 1
        trajectory.create(f, layouts, len(rows) - 1, storage)
        for e, row in enumerate(rows):
            trajectory.write_row(f, e, {"image": row, "text": torch.ones(2)})
    return Trajectory(path)


def _worst_difference_error(t, rows, gap=2):
    """Largest relative error of theta_{s+gap} - theta_s, the quantity the matching loss is
    made of (its target offset and its normaliser)."""
    worst = 0.0
    for s in range(len(rows) - gap):
        true = rows[s + gap] - rows[s]
        got = t.params("image", s + gap) - t.params("image", s)
        worst = max(worst, ((got - true).norm() / true.norm()).item())
    return worst


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_offsets_keep_epoch_differences_at_the_dtypes_precision(tmp_path, dtype):
    rows = _drifting_rows()
    plain = _stored(tmp_path / "plain.h5", rows, {"dtype": dtype, "offsets": False})
    offset = _stored(tmp_path / "offset.h5", rows, {"dtype": dtype, "offsets": True})
    eps = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[dtype]
    # Rounding the values themselves loses most of a difference that is 1e-3 of them ...
    assert _worst_difference_error(plain, rows) > 20 * eps
    # ... rounding the offsets from the initial parameters keeps it to the dtype's precision.
    assert _worst_difference_error(offset, rows) < 2 * eps
    # Row 0 is the base plus its rounding residual: close to float32.
    assert (offset.params("image", 0) - rows[0]).abs().max() <= 2 * eps * eps * rows[0].abs().max()
    plain.close()
    offset.close()


def test_offsets_without_their_base_are_a_damaged_file(tmp_path):
    t = _stored(tmp_path / "t.h5", _drifting_rows(n_epochs=2, size=10),
                {"dtype": "float16", "offsets": True})
    t.close()
    with h5py.File(tmp_path / "t.h5", "a") as f:
        del f["image/base"]
    with pytest.raises(VlddError, match="damaged trajectory.*rerun train_expert"):
        Trajectory(tmp_path / "t.h5")


def test_unknown_storage_option_is_refused():
    from vldd.errors import VlddError
    from vldd.trajectory import storage_spec

    with pytest.raises(VlddError, match="experts.storage"):
        storage_spec({"dtype": "int8"})
