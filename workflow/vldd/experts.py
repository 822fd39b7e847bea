"""train_expert: train one expert on the full training data and record its trajectory."""
from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from .data import load_prepared
from .embed import load_embeddings
from .errors import VlddError
from .io import config_hash, h5_dataset, h5_writer, open_h5, provenance
from .model import (build_model, cuda_rng_state, logit_scale, real_features, resolve_device,
                    retrieval, set_cuda_rng_state)
from .train import train_contrastive
from . import trajectory

log = logging.getLogger(__name__)

METRIC_ORDER = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")


class RealData:
    """Trunk features of the real images of a split, and the split's (image, caption) pairs.

    The trunk is frozen, so its features are computed once for the whole split; without a
    trunk (`trainable: all` or `lora`) the uint8 images are normalised per batch instead
    (model.PixelBatches).
    """

    def __init__(self, prepared, embeddings, model, split, device):
        self.image_ids = prepared.split_images(split)
        pos = {int(i): k for k, i in enumerate(self.image_ids)}
        caps = prepared.split_captions(split)
        self.caption_ids = caps["caption_id"].to_numpy()
        self.pair_img = torch.as_tensor([pos[int(i)] for i in caps["image_index"]],
                                        dtype=torch.long)
        self.texts = torch.as_tensor(embeddings[self.caption_ids]).to(device)
        self.feats = real_features(model.tower, prepared.images[self.image_ids], device)
        self.pair_txt = torch.arange(len(self.caption_ids))

    def __len__(self):
        return len(self.image_ids)

    def recall(self, model):
        return retrieval(model, self.feats, self.texts, self.pair_img.numpy())


def train_on_real(model, data: RealData, model_cfg, cfg, seed, on_epoch_end=None,
                  checkpoint=None, progress=None):
    """The training loop on real pairs with the settings of an `experts` or `full` section."""
    return train_contrastive(
        model, data.feats, data.texts, data.pair_img, data.pair_txt, epochs=int(cfg["epochs"]),
        lr_image=float(cfg["lr_image"]), lr_text=float(cfg["lr_text"]),
        momentum=float(cfg.get("momentum", 0.0)), weight_decay=float(cfg.get("weight_decay", 0.0)),
        batch_size=int(cfg["batch_size"]), logit_scale=logit_scale(model_cfg), seed=seed,
        per_image=cfg.get("sample", "captions") == "images", on_epoch_end=on_epoch_end,
        checkpoint=checkpoint, progress=progress)


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
            for g, pg in enumerate(opt.param_groups):
                for j, p in enumerate(pg["params"]):
                    name = f"momentum/{g}_{j}"
                    if name in f:
                        opt.state[p]["momentum_buffer"] = torch.as_tensor(f[name][()]).to(p.device)
            gen.set_state(torch.as_tensor(f["gen"][()]))
            torch.set_rng_state(torch.as_tensor(f["torch_rng"][()]))
            if "cuda_rng" in f:
                set_cuda_rng_state(f["cuda_rng"][()], self._device())
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
            h5_dataset(f, "gen", gen.get_state().numpy())
            h5_dataset(f, "torch_rng", torch.get_rng_state().numpy())
            cuda = cuda_rng_state(self._device())
            if cuda is not None:
                h5_dataset(f, "cuda_rng", cuda)
            for g, pg in enumerate(opt.param_groups):
                for j, p in enumerate(pg["params"]):
                    buf = opt.state.get(p, {}).get("momentum_buffer")
                    if buf is not None:
                        h5_dataset(f, f"momentum/{g}_{j}", buf.detach().cpu().numpy())

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


def data_fingerprint(data_dir, embeddings_path) -> dict:
    """What a resumed expert must share with the files it resumes from, besides the config."""
    data_dir = Path(data_dir)
    captions = hashlib.sha256((data_dir / "captions.parquet").read_bytes()).hexdigest()
    with open_h5(data_dir / "images.h5", "images") as f:
        images = {"config": f.attrs.get("config_sha256", ""), "shape": list(f["images"].shape)}
    with open_h5(embeddings_path, "embeddings") as f:
        emb = {k: str(f.attrs.get(k, "")) for k in sorted(f.attrs) if k != "git_commit"}
    return {"captions_sha256": captions, "images": images, "embeddings": emb}


def check_experts_data(trajectories, data_dir, embeddings_path):
    """Refuse experts trained on other data (another dataset, captions or text embeddings)."""
    here = config_hash(data_fingerprint(data_dir, embeddings_path))
    for t in trajectories:
        theirs = t.attrs.get("data_sha256")
        if theirs is not None and theirs != here:
            raise VlddError(
                f"{t.path}: this expert was trained on other data than {data_dir} with "
                f"{embeddings_path} (another dataset, caption set or text encoder). Rerun "
                "train_expert for this data, or point the stage at the matching experts.")


def train_expert(data_dir, embeddings_path, model_cfg, expert_cfg, index, out_path,
                 device="auto"):
    """Train expert `index` and write its trajectory to out_path; resumes a killed run from
    the epoch files in `<out_path>.ckpt/`."""
    dev = resolve_device(device)
    seed = int(expert_cfg.get("seed", 0)) + int(index)
    prepared = load_prepared(data_dir)
    emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
    model = build_model(model_cfg, emb.shape[1], seed).to(dev)
    train = RealData(prepared, emb, model, "train", dev)
    val = RealData(prepared, emb, model, "val", dev) if len(prepared.split_images("val")) else None
    layouts = model.layouts()
    epochs = int(expert_cfg["epochs"])
    section = {"model": model_cfg, "experts": expert_cfg}
    attrs = provenance("trajectory", section, seed=seed,
                       index=int(index), image_encoder=model_cfg["image_encoder"],
                       text_encoder=model_cfg["text_encoder"], n_epochs=epochs,
                       lr_image=float(expert_cfg["lr_image"]),
                       lr_text=float(expert_cfg["lr_text"]))
    attrs["n_epochs"] = epochs
    attrs["data_sha256"] = config_hash(data_fingerprint(data_dir, embeddings_path))
    key = config_hash({**section, "index": int(index), "vldd": attrs["vldd_version"],
                       "data": attrs["data_sha256"]})
    store = EpochStore(str(out_path) + ".ckpt", key, model, val, expert_cfg.get("storage"))
    train_on_real(model, train, model_cfg, expert_cfg, seed, checkpoint=store,
                  progress=f"train_expert {index}")
    store.assemble(out_path, attrs, layouts, epochs)
