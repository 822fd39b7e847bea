"""Resumable work: what a killed job leaves behind so that a rerun continues where it stopped.

EpochStore keeps an expert's finished epochs; the random states (torch, CUDA, the batch
generator) and optimiser moments are saved and restored here for experts and distill alike.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from . import config, trajectory
from .errors import VlddError
from .io import config_hash, h5_dataset, h5_writer, open_h5
from .metrics import METRIC_ORDER
from .model import cuda_rng_state, set_cuda_rng_state

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- shared

# optimiser state key -> HDF5 group (SGD's momentum, Adam's moments and step count)
STATE_GROUPS = {"momentum_buffer": "momentum", "exp_avg": "exp_avg",
                "exp_avg_sq": "exp_avg_sq", "step": "step"}


def _slots(optimizers):
    """(name, optimiser, parameter) of every parameter: name `k_j` is the j-th parameter of
    the k-th parameter group, counted over the optimisers in order."""
    k = 0
    for opt in optimizers:
        for group in opt.param_groups:
            for j, p in enumerate(group["params"]):
                yield f"{k}_{j}", opt, p
            k += 1


def save_optimizers(f, optimizers) -> None:
    """Every optimiser state tensor (a parameter without a gradient so far has none)."""
    for slot, opt, p in _slots(optimizers):
        for key, group in STATE_GROUPS.items():
            value = opt.state.get(p, {}).get(key)
            if torch.is_tensor(value):
                h5_dataset(f, f"{group}/{slot}", value.detach().cpu().numpy())


def load_optimizers(f, optimizers) -> None:
    for slot, opt, p in _slots(optimizers):
        for key, group in STATE_GROUPS.items():
            name = f"{group}/{slot}"
            if name in f:
                value = torch.as_tensor(f[name][()])
                opt.state[p][key] = value if key == "step" else value.to(p.device)


def save_rngs(f, gen, device) -> None:
    """The batch generator, torch's global generator (dropout) and CUDA's on a GPU."""
    h5_dataset(f, "gen", gen.get_state().numpy())
    h5_dataset(f, "torch_rng", torch.get_rng_state().numpy())
    cuda = cuda_rng_state(device)
    if cuda is not None:
        h5_dataset(f, "cuda_rng", cuda)


def load_rngs(f, gen, device) -> None:
    gen.set_state(torch.as_tensor(f["gen"][()]))
    torch.set_rng_state(torch.as_tensor(f["torch_rng"][()]))
    if "cuda_rng" in f:
        set_cuda_rng_state(f["cuda_rng"][()], device)


# ----------------------------------------------------------------------------- experts


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


class EpochStore:
    """Resumable expert training: every finished epoch is one small HDF5 file in
    `<out>.ckpt/` (written atomically), holding that epoch's trajectory row and metrics and
    everything needed to continue from it (optimiser momentum, random states). A killed job
    resumes from the last file; the trajectory is assembled from them when training ends and
    the folder is removed. Files of another configuration or data are ignored.
    """

    def __init__(self, folder, key, model, val, storage=None):
        self.folder, self.key, self.model, self.val = Path(folder), key, model, val
        self.storage = trajectory.storage_spec(storage)
        self.groups = {"image": model.tail, "text": model.head}

    def _path(self, epoch):
        return self.folder / f"epoch_{epoch:04d}.h5"

    def _device(self):
        return next(self.model.head.parameters()).device

    def finished(self) -> list:
        """Epochs 0..k with a readable file of this configuration (the longest such run)."""
        done = []
        while self._path(len(done)).exists():
            try:
                with open_h5(self._path(len(done)), "expert-epoch") as f:
                    if f.attrs.get("key") != self.key:
                        break
            except VlddError:
                break
            done.append(len(done))
        if not done and self.folder.exists():
            stale = sorted(self.folder.glob("epoch_*.h5"))
            if stale:
                log.warning("%s: %d epoch files of another configuration; starting afresh",
                            self.folder, len(stale))
                shutil.rmtree(self.folder)
        return done

    def restore(self, opt, gen) -> int:
        done = self.finished()
        if not done:
            self.save(0, float("nan"), opt, gen)
            return 0
        last = done[-1]
        with open_h5(self._path(last), "expert-epoch") as f:
            with torch.no_grad():
                for group, module in self.groups.items():
                    torch.nn.utils.vector_to_parameters(
                        torch.as_tensor(f[group][()]).to(next(module.parameters()).device),
                        _trainable(module))
            load_optimizers(f, [opt])
            load_rngs(f, gen, self._device())
        log.info("resuming from epoch %d (%s)", last, self.folder)
        return last

    def save(self, epoch, loss, opt, gen):
        val = np.full(6, np.nan)
        if epoch > 0 and self.val is not None:
            r = self.val.recall(self.model)
            val = np.array([r[k] for k in METRIC_ORDER])
            log.info("epoch %d loss %.4f val %s", epoch, loss,
                     " ".join(f"{k}={v:.1f}" for k, v in zip(METRIC_ORDER, val)))
        elif epoch > 0:
            log.info("epoch %d loss %.4f", epoch, loss)
        attrs = {"schema": "vldd/expert-epoch", "key": self.key, "epoch": epoch, "loss": loss}
        with h5_writer(self._path(epoch), attrs) as f:
            for group, module in self.groups.items():
                h5_dataset(f, group, trajectory.flatten(_trainable(module)).numpy())
            h5_dataset(f, "val", val)
            save_rngs(f, gen, self._device())
            save_optimizers(f, [opt])

    def assemble(self, out_path, attrs, layouts, epochs):
        with h5_writer(out_path, attrs) as out:
            trajectory.create(out, layouts, epochs, self.storage)
            for epoch in range(epochs + 1):
                with open_h5(self._path(epoch), "expert-epoch") as f:
                    trajectory.write_row(out, epoch, {g: torch.as_tensor(f[g][()])
                                                      for g in self.groups})
                    if epoch > 0:
                        out["metrics"]["loss"][epoch - 1] = f.attrs["loss"]
                        out["metrics"]["val"][epoch - 1] = f["val"][()]
        shutil.rmtree(self.folder)


# ----------------------------------------------------------------------------- distill


def save_distiller(d, path, key) -> None:
    """Everything a Distiller needs to continue bit for bit: the data, the lrs, the
    optimisers, the random states, the curve so far and the best window."""
    with h5_writer(path, {"schema": "vldd/checkpoint", "key": key,
                          "iteration": d.iteration}) as f:
        h5_dataset(f, "images", d.images.detach().cpu().numpy())
        h5_dataset(f, "texts", d.texts.detach().cpu().numpy())
        h5_dataset(f, "lrs", np.array([float(p.detach()) for p in d.lr_params]))
        if d.similarity is not None:    # LoRS
            for name, arr in d.similarity.arrays().items():
                h5_dataset(f, f"similarity/{name}", arr)
        if d.ema is not None:           # distill.ema
            for name, arr in d.ema.arrays().items():
                h5_dataset(f, f"ema/{name}", arr)
        if d.covmatch is not None:      # its online model
            d.covmatch.save(f)
        save_rngs(f, d.gen, d.dev)
        save_optimizers(f, d.optimizers)
        best = None
        if d.best is not None:
            h5_dataset(f, "best/images", d.best["images"])
            h5_dataset(f, "best/texts", d.best["texts"])
            for name, arr in (d.best.get("similarity") or {}).items():
                h5_dataset(f, f"best/similarity/{name}", arr)
            best = {k: d.best[k] for k in ("loss", "iteration", "lrs")}
        f.attrs["meta"] = json.dumps({"order": [int(x) for x in d.order], "curve": d.curve,
                                      "rng": d.rng.bit_generator.state, "best": best})


def load_distiller(d, path, key) -> bool:
    """Put a checkpoint of this configuration back into `d`; False (and a warning when
    there is a file) if there is none usable."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        f = open_h5(path, "checkpoint")
    except VlddError as exc:
        log.warning("ignoring unreadable checkpoint: %s", exc)
        return False
    with f:
        if f.attrs.get("key") != key:
            log.warning("checkpoint %s is from another configuration; starting afresh", path)
            return False
        with torch.no_grad():
            d.images.copy_(torch.as_tensor(f["images"][()]))
            d.texts.copy_(torch.as_tensor(f["texts"][()]))
            for p, v in zip(d.lr_params, f["lrs"][()]):
                p.fill_(float(v))
            if d.similarity is not None:
                for p, name in zip(d.similarity.params, d.similarity.NAMES[d.similarity.kind]):
                    p.copy_(torch.as_tensor(f[f"similarity/{name}"][()]))
        if d.ema is not None:
            d.ema.load({k: v[()] for k, v in f["ema"].items()})
        if d.covmatch is not None:
            d.covmatch.load(f)
        load_rngs(f, d.gen, d.dev)
        meta = json.loads(f.attrs["meta"])
        d.order = list(meta["order"])
        d.curve = [tuple(c) for c in meta["curve"]]
        d.rng.bit_generator.state = meta["rng"]
        if meta.get("best") is not None:
            d.best = {**meta["best"], "images": f["best/images"][()],
                      "texts": f["best/texts"][()],
                      "similarity": ({k: v[()] for k, v in f["best/similarity"].items()}
                                     if "best/similarity" in f else None)}
        d.iteration = int(f.attrs["iteration"])
        load_optimizers(f, d.optimizers)
    log.info("resumed from %s at iteration %d", path, d.iteration)
    return True


def checkpoint_key(model_cfg, cfg, budget, expert_paths) -> str:
    """What a checkpoint must match to be resumed: the settings, and the experts' own config
    hash and data fingerprint (retrained experts invalidate it)."""
    model_cfg = config.section("model", model_cfg).as_dict()
    cfg = config.section("distill", cfg).as_dict()
    ids = []
    for p in expert_paths:
        with open_h5(p, "trajectory") as f:
            ids.append([str(f.attrs.get("config_sha256", "")), str(f.attrs.get("data_sha256", ""))])
    return config_hash({"model": model_cfg, "distill": cfg, "budget": int(budget),
                        "experts": [str(p) for p in expert_paths], "expert_ids": ids})
