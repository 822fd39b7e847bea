"""distill: bi-trajectory matching (Wu et al., TMLR 2024).

Each iteration starts a student at an expert's parameters theta*_s, takes `syn_steps` SGD
steps on mini-batches of the distilled pairs with the learnable lrs and measures how close it
lands to theta*_{s+R}:

    L = |theta_img - theta*_img,s+R|^2 / |theta*_img,s - theta*_img,s+R|^2  + (same for text)

The gradient of L w.r.t. the pixels, the text embeddings and the lrs comes from the engine
that `distill.engine` names (vldd.engines): exact backpropagation through all steps by
default, or the checkpointed (exact, less memory), constant-memory (TESLA, approximate) or
heads-only (image encoder frozen) engines. The student is one module evaluated with
torch.func.functional_call on flat parameter vectors; the frozen image trunk runs on the
distilled pixels once per iteration.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .coreset import check_expert_model, random_pairs, real_pairs
from .data import load_prepared
from .embed import load_embeddings
from .engines import EngineOptions, Unroll, apply_backend, check_engine, meta_gradient
from .losses import matching_loss  # noqa: F401
from .errors import VlddError
from .experts import check_experts_data, data_fingerprint
from .io import atomic_path, h5_dataset, h5_writer, open_h5, provenance, write_parquet, config_hash
from .model import build_model, cuda_rng_state, logit_scale, resolve_device, set_cuda_rng_state
from .pairset import PairSet, write_pairset
from .progress import Progress
from .train import train_mode
from .trajectory import Trajectory

log = logging.getLogger(__name__)

# Noise initialisation statistics of the seed code (normalised pixels, BERT [CLS] space).
NOISE_IMAGE = ((-0.0626, -0.0221, 0.0680), (1.0451, 1.0752, 1.0539))


def _check_schedule(cfg, n_epochs, path):
    need = int(cfg["max_start_epoch"]) - 1 + int(cfg["expert_epochs"])
    if need > n_epochs:
        raise VlddError(f"{path}: has {n_epochs} epochs, but distill.max_start_epoch "
                        f"({cfg['max_start_epoch']}) - 1 + distill.expert_epochs "
                        f"({cfg['expert_epochs']}) = {need}. Train longer experts or lower them.")


def _check_rows(t, last: int):
    """Read every epoch the run can draw (0..last) once, so that a truncated or corrupt
    expert is refused before the first iteration rather than hours into the run."""
    for group in ("image", "text"):
        for epoch in range(last + 1):
            t.rows(group, epoch)


# The curve: one row per iteration. term_*: each encoder's normalised matching term;
# grad_*: the norm of the meta-gradient of the pixels, the texts and each lr; step_*: the
# update of the pixels / texts relative to their norm.
DIAGNOSTICS = ["term_image", "term_text", "grad_images", "grad_texts", "grad_lr_image",
               "grad_lr_text", "step_images", "step_texts"]
CURVE_COLUMNS = ["iteration", "matching_loss", "lr_image", "lr_text", "expert",
                 "start_epoch"] + DIAGNOSTICS


def _norm(t):
    return float("nan") if t is None else float(t.detach().float().norm())


def _diagnostics(terms, grads, before, after):
    out = [float(terms[g]) if g in terms else float("nan") for g in ("image", "text")]
    out += [_norm(g) for g in grads]
    out += [_norm(a - b) / max(_norm(b), 1e-12) for a, b in zip(after, before)]
    return out


# optimiser state in a checkpoint: state key -> HDF5 group (momentum keeps its old name)
_STATE_GROUPS = {"momentum_buffer": "momentum", "exp_avg": "exp_avg",
                 "exp_avg_sq": "exp_avg_sq", "step": "step"}


def _optimizer(cfg, params, lr):
    """The optimiser of one kind of distilled tensor (pixels, texts or the lrs):
    distill.optimizer sgd (with distill.momentum, as the seed code) or adam (per-element
    steps of about lr whatever the gradient's scale)."""
    kind = str(cfg.get("optimizer", "sgd"))
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, betas=(float(cfg.get("momentum", 0.5)), 0.999))
    return torch.optim.SGD(params, lr=lr, momentum=float(cfg.get("momentum", 0.5)))


class Distiller:
    """The state of one distillation run: data, lrs, optimisers, rngs; checkpointable."""

    def __init__(self, data_dir, embeddings_path, expert_paths, model_cfg, cfg, budget, device):
        self.cfg, self.model_cfg, self.budget = cfg, model_cfg, int(budget)
        self.dev = resolve_device(device)
        seed = int(cfg.get("seed", 0))
        prepared = load_prepared(data_dir)
        emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
        self.engine = str(cfg.get("engine", "exact"))
        check_engine(self.engine)
        self.opts = EngineOptions.from_config(cfg)
        self.model = build_model(model_cfg, emb.shape[1], seed).to(self.dev)
        apply_backend(self.opts, self.model, self.dev)
        self.layouts = self.model.layouts()
        if not expert_paths:
            raise VlddError("distill needs at least one expert trajectory (experts.count >= 1).")
        self.experts = [Trajectory(p) for p in expert_paths]
        check_experts_data(self.experts, data_dir, embeddings_path)
        for t in self.experts:
            check_expert_model(t, model_cfg)
            for group in ("image", "text"):
                t.check_layout(group, self.layouts[group])
            _check_schedule(cfg, t.n_epochs, t.path)
            _check_rows(t, int(cfg["max_start_epoch"]) - 1 + int(cfg["expert_epochs"]))
        tower = self.model.tower
        self.mean, self.std = tower.mean, tower.std
        ids = random_pairs(prepared, self.budget, seed, where="distill budget")
        images, texts = real_pairs(prepared, emb, ids, tower.mean, tower.std)
        init = cfg.get("init", {"image": "real", "text": "real"})
        g = torch.Generator().manual_seed(seed)
        images = torch.as_tensor(images)
        texts = torch.as_tensor(texts)
        if init.get("image", "real") == "noise":
            m = torch.tensor(NOISE_IMAGE[0]).view(1, 3, 1, 1)
            s = torch.tensor(NOISE_IMAGE[1]).view(1, 3, 1, 1)
            images = torch.randn(images.shape, generator=g) * s + m
            ids = np.full_like(ids, -1)
        if init.get("text", "real") == "noise":
            texts = torch.randn(texts.shape, generator=g) * texts.std() + texts.mean()
        self.caption_ids = ids
        self.init_images, self.init_texts = images.clone(), texts.clone()
        self.images = images.to(self.dev).requires_grad_(True)
        self.texts = texts.to(self.dev).requires_grad_(True)
        # the learnable student lrs: the lrs themselves (linear) or their logarithms (log)
        self.lr_space = str(cfg.get("lr_space", "linear"))
        lr0 = float(cfg["lr_init"])
        raw = math.log(lr0) if self.lr_space == "log" else lr0
        self.lr_params = [torch.tensor(raw, device=self.dev, requires_grad=True)
                          for _ in range(2)]
        self.opt_img = _optimizer(cfg, [self.images], float(cfg["lr_image"]))
        self.opt_txt = _optimizer(cfg, [self.texts], float(cfg["lr_text"]))
        self.opt_lr = _optimizer(cfg, self.lr_params, float(cfg["lr_lr"]))
        self.learn = {"image": cfg.get("learn_images", True), "text": cfg.get("learn_texts", True)}
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # dropout inside the unroll
        self.order = []
        # distill.select best: the data (and lrs) at the end of the window of `select_window`
        # iterations with the lowest mean matching loss, kept as the run goes
        self.select = str(cfg.get("select", "last"))
        self.window = int(cfg.get("select_window") or max(1, int(cfg["iterations"]) // 10))
        self.best = None
        self.saved = False      # a checkpoint of this run was written or read
        self.checkpoint_path = Path(".")
        self.iteration = 0
        self.curve = []

    @property
    def lr_img(self):
        return self._lr(0)

    @property
    def lr_txt(self):
        return self._lr(1)

    def _lr(self, i):
        p = self.lr_params[i].detach()
        return p.exp() if self.lr_space == "log" else p

    def _next_expert(self):
        if not self.order:
            self.order = list(self.rng.permutation(len(self.experts)))
        return int(self.order.pop(0))

    def _segment(self):
        """One (expert, start epoch) segment: its matching loss, per-encoder terms and the
        meta-gradients of pixels, texts and the two lrs (w.r.t. the lrs themselves)."""
        cfg = self.cfg
        e = self._next_expert()
        start = int(self.rng.integers(0, int(cfg["max_start_epoch"])))
        target_epoch = start + int(cfg["expert_epochs"])
        rows = {g: self.experts[e].rows(g, start, target_epoch) for g in ("image", "text")}
        theta0 = {g: rows[g][0].to(self.dev) for g in rows}
        target = {g: rows[g][1].to(self.dev) for g in rows}
        lrs = [self._lr(i).clone().requires_grad_(True) for i in range(2)]
        terms = {}
        problem = Unroll(self.model, self.layouts, theta0, target,
                         syn_steps=int(cfg["syn_steps"]), mini_batch=int(cfg["mini_batch"]),
                         scale=logit_scale(self.model_cfg, inner_loop=True), gen=self.gen,
                         opts=self.opts, terms=terms)
        loss, grads = meta_gradient(self.engine, problem, self.images, self.texts, lrs[0], lrs[1])
        return e, start, float(loss), terms, grads

    def step(self):
        cfg = self.cfg
        train_mode(self.model)
        n = int(cfg.get("segments", 1))
        value, terms, grads = 0.0, {}, [None] * 4
        for _ in range(n):       # the meta-gradients of n segments, averaged
            e, start, loss, t, g = self._segment()
            if not np.isfinite(loss):
                raise VlddError(
                    f"distillation diverged at iteration {self.iteration}: matching loss "
                    f"{loss}, lr_image {float(self.lr_img):.4g}, lr_text "
                    f"{float(self.lr_txt):.4g}. Lower distill.lr_image / lr_text / lr_lr, or "
                    "syn_steps." + (" The last checkpoint is kept." if self.saved
                                    and self.checkpoint_path.exists() else ""))
            value += loss / n
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v / n
            grads = [a if b is None else (b / n if a is None else a + b / n)
                     for a, b in zip(grads, g)]
        if self.lr_space == "log":   # d/dlog(lr) = lr * d/dlr
            grads[2:] = [None if g is None else g * self._lr(i) for i, g in enumerate(grads[2:])]
        for opt in (self.opt_img, self.opt_txt, self.opt_lr):
            opt.zero_grad(set_to_none=True)
        for p, g in zip((self.images, self.texts, *self.lr_params), grads):
            p.grad = g
        before = (self.images.detach().clone(), self.texts.detach().clone())
        lrs_before = [float(self._lr(i)) for i in range(2)]
        if self.learn["image"]:
            self.opt_img.step()
        if self.learn["text"]:
            self.opt_txt.step()
        if self.cfg.get("learn_lr", True):
            self.opt_lr.step()
            lr_min = cfg.get("lr_min")
            if lr_min is not None:  # the seed code lets lrs go negative; a floor keeps them usable
                floor = math.log(float(lr_min)) if self.lr_space == "log" else float(lr_min)
                with torch.no_grad():
                    for p in self.lr_params:
                        p.clamp_(min=floor)
        diag = _diagnostics(terms, grads, before, (self.images.detach(), self.texts.detach()))
        self.curve.append((self.iteration, value, float(self.lr_img), float(self.lr_txt), e,
                           start, *diag))
        if self.select == "best" and len(self.curve) >= self.window:
            mean = float(np.mean([row[1] for row in self.curve[-self.window:]]))
            if self.best is None or mean < self.best["loss"]:
                # the state this iteration was scored with, the last of the window
                self.best = {"loss": mean, "iteration": self.iteration,
                             "images": before[0].cpu().numpy(), "texts": before[1].cpu().numpy(),
                             "lrs": lrs_before}
        self.iteration += 1
        return value

    def chosen(self):
        """(images, texts, [lr_image, lr_text], iteration) of the data to save: the last state,
        or with select best the best window's (the last state while no window is complete)."""
        if self.select == "best" and self.best is not None:
            b = self.best
            return b["images"], b["texts"], b["lrs"], b["iteration"]
        return (self.images.detach().cpu().numpy(), self.texts.detach().cpu().numpy(),
                [float(self.lr_img), float(self.lr_txt)], self.iteration)

    # -- checkpoints: everything needed to continue bit for bit

    def _state(self):
        return {
            "images": self.images.detach().cpu().numpy(), "texts": self.texts.detach().cpu().numpy(),
            "lrs": np.array([float(p.detach()) for p in self.lr_params]),
            "iteration": self.iteration, "order": self.order, "curve": self.curve,
            "rng": self.rng.bit_generator.state, "gen": self.gen.get_state().numpy(),
            "torch_rng": torch.get_rng_state().numpy(), "cuda_rng": cuda_rng_state(self.dev),
            "opt": [o.state_dict() for o in (self.opt_img, self.opt_txt, self.opt_lr)],
        }

    def save_checkpoint(self, path, key):
        s = self._state()
        self.saved, self.checkpoint_path = True, Path(path)
        with h5_writer(path, {"schema": "vldd/checkpoint", "key": key,
                              "iteration": s["iteration"]}) as f:
            for name in ("images", "texts", "lrs", "gen", "torch_rng", "cuda_rng"):
                if s[name] is not None:   # cuda_rng: only on a GPU
                    h5_dataset(f, name, s[name])
            for i, st in enumerate(s["opt"]):
                # keyed by the parameter's index in its optimiser: a parameter without a
                # gradient so far (the image lr of heads-only) has no state
                for j, buf in st["state"].items():
                    for key, group in _STATE_GROUPS.items():   # what load_checkpoint reads
                        if torch.is_tensor(buf.get(key)):
                            h5_dataset(f, f"{group}/{i}_{j}", buf[key].cpu().numpy())
            best = None
            if self.best is not None:
                h5_dataset(f, "best/images", self.best["images"])
                h5_dataset(f, "best/texts", self.best["texts"])
                best = {k: self.best[k] for k in ("loss", "iteration", "lrs")}
            f.attrs["meta"] = json.dumps({"order": [int(x) for x in s["order"]],
                                          "curve": s["curve"], "rng": s["rng"], "best": best})

    def load_checkpoint(self, path, key) -> bool:
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
                self.images.copy_(torch.as_tensor(f["images"][()]))
                self.texts.copy_(torch.as_tensor(f["texts"][()]))
                for p, v in zip(self.lr_params, f["lrs"][()]):
                    p.fill_(float(v))
            self.gen.set_state(torch.as_tensor(f["gen"][()]))
            torch.set_rng_state(torch.as_tensor(f["torch_rng"][()]))
            if "cuda_rng" in f:
                set_cuda_rng_state(f["cuda_rng"][()], self.dev)
            meta = json.loads(f.attrs["meta"])
            self.order = list(meta["order"])
            self.curve = [tuple(c) for c in meta["curve"]]
            self.rng.bit_generator.state = meta["rng"]
            if meta.get("best") is not None:
                self.best = {**meta["best"], "images": f["best/images"][()],
                             "texts": f["best/texts"][()]}
            self.iteration = int(f.attrs["iteration"])
            for i, opt in enumerate((self.opt_img, self.opt_txt, self.opt_lr)):
                params = opt.param_groups[0]["params"]
                for j, p in enumerate(params):
                    for key, group in _STATE_GROUPS.items():
                        name = f"{group}/{i}_{j}"
                        if name in f:
                            value = torch.as_tensor(f[name][()])
                            opt.state[p][key] = value if key == "step" else value.to(self.dev)
        self.saved, self.checkpoint_path = True, path
        log.info("resumed from %s at iteration %d", path, self.iteration)
        return True

    def pairset(self):
        images, texts, lrs, iteration = self.chosen()
        bad = [f"{name} {lr:.4g}" for name, lr in zip(("lr_image", "lr_text"), lrs)
               if not (math.isfinite(lr) and lr > 0)]
        if bad:   # only with lr_min null: evaluate would train by gradient ascent
            raise VlddError(
                f"the learned lrs went to zero or below ({', '.join(bad)}), so the pair set "
                "would train by gradient ascent. Set distill.lr_min (e.g. 0.01) or "
                "lr_space: log, or lower distill.lr_lr.")
        if not (np.isfinite(images).all() and np.isfinite(texts).all()):
            raise VlddError("the distilled images or texts hold NaN or inf: lower "
                            "distill.lr_image / lr_text.")
        if self.select == "best":
            log.info("saving the data of iteration %d (select best: mean matching loss %.4f "
                     "over its window of %d iterations)", iteration,
                     self.best["loss"] if self.best else float("nan"), self.window)
        return PairSet(images, texts, self.caption_ids, kind="distilled",
                       method=self.cfg.get("method", "mtt"), mean=self.mean, std=self.std,
                       lr_image=float(lrs[0]), lr_text=float(lrs[1]),
                       init_images=self.init_images.numpy(), init_texts=self.init_texts.numpy(),
                       attrs={"selected_iteration": int(iteration)})

    def curve_frame(self):
        return pd.DataFrame(self.curve, columns=CURVE_COLUMNS)


def checkpoint_key(model_cfg, cfg, budget, expert_paths) -> str:
    """What a checkpoint must match to be resumed: the settings, and the experts' own config
    hash and data fingerprint (retrained experts invalidate it)."""
    ids = []
    for p in expert_paths:
        with open_h5(p, "trajectory") as f:
            ids.append([str(f.attrs.get("config_sha256", "")), str(f.attrs.get("data_sha256", ""))])
    return config_hash({"model": model_cfg, "distill": cfg, "budget": int(budget),
                        "experts": [str(p) for p in expert_paths], "expert_ids": ids})


def distill(data_dir, embeddings_path, expert_paths, model_cfg, cfg, budget, out_pairs,
            out_curve, checkpoint=None, device="auto"):
    """Run (or resume) a distillation and write the pair set and the loss/lr curve."""
    section = {"model": model_cfg, "distill": cfg, "budget": int(budget),
               "experts": [str(p) for p in expert_paths]}
    key = checkpoint_key(model_cfg, cfg, budget, expert_paths)
    d = Distiller(data_dir, embeddings_path, expert_paths, model_cfg, cfg, budget, device)
    checkpoint = Path(checkpoint) if checkpoint else Path(str(out_pairs) + ".ckpt.h5")
    d.load_checkpoint(checkpoint, key)
    every = int(cfg.get("checkpoint_every", 0))
    iterations = int(cfg["iterations"])
    bar = Progress(iterations, f"distill {cfg.get('method', 'mtt')} n{budget}", start=d.iteration,
                   log=log)
    while d.iteration < iterations:
        loss = d.step()
        bar.update(1, matching_loss=float(loss), lr_image=float(d.lr_img),
                   lr_text=float(d.lr_txt))
        if every and d.iteration % every == 0 and d.iteration < iterations:
            d.save_checkpoint(checkpoint, key)
    prov = provenance("pairset", section, seed=int(cfg.get("seed", 0)),
                      image_encoder=model_cfg["image_encoder"],
                      text_encoder=model_cfg["text_encoder"],
                      data_sha256=config_hash(data_fingerprint(data_dir, embeddings_path)))
    write_pairset(out_pairs, d.pairset(), prov)
    write_parquet(d.curve_frame(), out_curve, meta=prov)
    for t in d.experts:
        t.close()
    if checkpoint.exists():
        checkpoint.unlink()
