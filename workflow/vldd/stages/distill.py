"""distill: bi-trajectory matching (Wu et al., TMLR 2024).

Each iteration starts a student at an expert's parameters theta*_s, takes `syn_steps` SGD
steps on mini-batches of the distilled pairs with the learnable lrs and measures how close it
lands to theta*_{s+R}:

    L = |theta_img - theta*_img,s+R|^2 / |theta*_img,s - theta*_img,s+R|^2  + (same for text)

The gradient of L w.r.t. the pixels, the text embeddings and the lrs comes from the engine
`distill.engine` names (vldd.engines: exact BPTT by default, checkpointed, constant-memory,
heads-only; auto picks exact or checkpointed by a measured memory model). The student is one
module evaluated with torch.func.functional_call on flat parameter vectors; the frozen trunk
runs on the distilled pixels once per iteration. distill.method lors (ICML 2024) learns a
similarity matrix over the pairs (vldd.similarity) as the students' soft target; repblend
(NeurIPS 2025) adds representation blending to every student step (the paper trains image
and text projection heads on a frozen encoder: model.image_encoder.trainable heads);
covmatch replaces the unroll by vldd.covmatch's second-moment matching and reads no experts;
distill.phases runs the loop once per phase (vldd.phases). The outer loop's parts: vldd.outer.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .. import config, phases
from ..checkpoint import checkpoint_key, load_distiller, save_distiller
from ..covmatch import CovMatch
from ..engines import EngineOptions, Unroll, apply_backend, check_engine, meta_gradient
from ..engines.memory import pick_engine
from ..errors import VlddError
from ..experts import data_fingerprint, load_experts
from ..io import config_hash, provenance, write_parquet
from ..model import build_model, logit_scale, resolve_device
from ..pairset import PairSet, write_pairset
from ..prepared import load_embeddings, load_prepared
from ..progress import Progress
from ..outer import (CURVE_COLUMNS, GRAD_COLUMNS, Ema, algorithm, clip, diagnostics,
                     learned_similarity, make_optimizer, pairs_to_distil)
from ..realdata import RealData, initial_pairs
from ..train import train_mode

log = logging.getLogger(__name__)

class Distiller:
    """The state of one distillation run: data, lrs, optimisers, rngs; checkpointable
    (vldd.checkpoint.save_distiller / load_distiller)."""

    def __init__(self, data_dir, embeddings_path, expert_paths, model_cfg, cfg, budget, device):
        model_cfg = config.section("model", model_cfg).as_dict()
        cfg = config.section("distill", cfg)
        self.cfg, self.model_cfg, self.budget = cfg, model_cfg, int(budget)
        self.dev = resolve_device(device)
        prepared = load_prepared(data_dir)
        emb = load_embeddings(embeddings_path, data_dir, model_cfg["text_encoder"])
        self.engine = cfg.engine
        check_engine(self.engine, allow_auto=True)
        self.opts = EngineOptions.from_config(cfg.as_dict())
        self.model = build_model(model_cfg, emb.shape[1], cfg.seed).to(self.dev)
        self.scale = logit_scale(model_cfg, inner_loop=True)     # the students' logit scale
        apply_backend(self.opts, self.model, self.dev)
        self.layouts = self.model.layouts()
        self.algorithm = algorithm(cfg.method)
        # CovMatch: no unroll, no experts; an online model trained on real pairs (vldd.covmatch)
        self.covmatch = (CovMatch(RealData(prepared, emb, self.model, "train", self.dev),
                                  emb.shape[1], model_cfg, cfg, self.dev)
                         if self.algorithm == "covmatch" else None)
        self.experts = [] if self.covmatch else load_experts(
            expert_paths, data_dir, embeddings_path, model_cfg, cfg, self.layouts)
        tower = self.model.tower
        self.mean, self.std = tower.mean, tower.std
        n_pairs = pairs_to_distil(cfg, self.budget)
        ids, images, texts = initial_pairs(prepared, emb, n_pairs, cfg, tower)
        self.caption_ids = ids
        self.init_images, self.init_texts = images.clone(), texts.clone()
        self.images = images.to(self.dev).requires_grad_(True)
        self.texts = texts.to(self.dev).requires_grad_(True)
        # the learnable student lrs: the lrs themselves (linear) or their logarithms (log)
        self.lr_space = cfg.lr_space
        raw = math.log(cfg.lr_init) if self.lr_space == "log" else float(cfg.lr_init)
        self.lr_params = [torch.tensor(raw, device=self.dev, requires_grad=True)
                          for _ in range(2)]
        self.optimizers = [make_optimizer(cfg, [self.images], float(cfg.lr_image)),
                           make_optimizer(cfg, [self.texts], float(cfg.lr_text)),
                           make_optimizer(cfg, self.lr_params, float(cfg.lr_lr))]
        self.learn = {"image": cfg.learn_images, "text": cfg.learn_texts, "lr": cfg.learn_lr}
        # LoRS, RepBlend: the similarity matrix over the distilled pairs, with its own lr
        self.similarity, opt = learned_similarity(cfg, n_pairs, self.dev)
        if opt is not None:
            self.optimizers.append(opt)
            self.learn["similarity"] = True
        self.ema = None if cfg.ema is None else Ema(cfg.ema, self.learned())
        self.rng = np.random.default_rng(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        torch.manual_seed(cfg.seed)  # dropout inside the unroll
        if self.engine == "auto":   # exact if its graph fits, else checkpointed (measured)
            self.engine = "exact" if self.covmatch else pick_engine(
                self._problem(0, 0), self.images, self.texts, self.lr_params,
                cfg.memory_budget_gb, self.dev)
        self.order, self.curve, self.iteration = [], [], 0
        # distill.select best: the data (and lrs) at the end of the window of `select_window`
        # iterations with the lowest mean matching loss, kept as the run goes
        self.window = int(cfg.select_window or max(1, int(cfg.iterations) // 10))
        self.best = None

    lr_img = property(lambda self: self._lr(0))
    lr_txt = property(lambda self: self._lr(1))

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
        if self.covmatch is not None:   # (model index, online steps) for (expert, start)
            return self.covmatch.segment(self.iteration, self.images, self.texts)
        e = self._next_expert()
        start = int(self.rng.integers(int(self.cfg.min_start_epoch),
                                      int(self.cfg.max_start_epoch)))
        lrs = [self._lr(i).clone().requires_grad_(True) for i in range(2)]
        terms = {}
        problem = self._problem(e, start, terms)
        loss, grads = meta_gradient(self.engine, problem, self.images, self.texts, lrs[0], lrs[1])
        return e, start, float(loss), terms, grads

    def _problem(self, e, start, terms=None) -> Unroll:
        """The inner problem of expert e's segment from epoch `start`."""
        cfg = self.cfg
        rows = {g: self.experts[e].rows(g, start, start + int(cfg.expert_epochs))
                for g in ("image", "text")}
        return Unroll(self.model, self.layouts, {g: rows[g][0].to(self.dev) for g in rows},
                      {g: rows[g][1].to(self.dev) for g in rows}, syn_steps=int(cfg.syn_steps),
                      mini_batch=int(cfg.mini_batch), scale=self.scale, gen=self.gen,
                      opts=self.opts, terms=terms, similarity=self.similarity,
                      blend=cfg.repblend.alpha if self.algorithm == "repblend" else None)

    def meta_gradient(self):
        """The matching loss, per-encoder terms and meta-gradients (pixels, texts, the two
        lrs, w.r.t. the lrs' parameters; then S's parameters with LoRS) averaged over
        distill.segments segments, and the (expert, start epoch) of the last."""
        n = int(self.cfg.segments)
        value, terms, grads = 0.0, {}, [None] * (4 + len(self._sim_params()))
        for _ in range(n):
            e, start, loss, t, g = self._segment()
            value += loss / n
            for k, v in t.items():
                terms[k] = terms.get(k, 0.0) + v / n
            grads = [a if b is None else (b / n if a is None else a + b / n)
                     for a, b in zip(grads, g)]
        if self.lr_space == "log":   # d/dlog(lr) = lr * d/dlr
            grads[2:4] = [None if g is None else g * self._lr(i) for i, g in enumerate(grads[2:4])]
        return value, terms, grads, (e, start)

    def iterate(self, checkpoint_kept: bool = False) -> float:
        """One iteration of the paper's loop: sample expert segments, take the meta-gradient
        of the matching loss, update the pixels, texts and lrs, log. Returns the loss."""
        train_mode(self.model)
        loss, terms, grads, where = self.meta_gradient()
        if not np.isfinite(loss):
            raise self.diverged(loss, checkpoint_kept)
        before = self.step(grads)
        self.record(loss, terms, grads, before, where)
        return loss

    def diverged(self, loss, checkpoint_kept: bool) -> VlddError:
        return VlddError(
            f"distillation diverged at iteration {self.iteration}: matching loss {loss}, "
            f"lr_image {float(self.lr_img):.4g}, lr_text {float(self.lr_txt):.4g}. Lower "
            "distill.lr_image / lr_text / lr_lr, or syn_steps."
            + (" The last checkpoint is kept." if checkpoint_kept else ""))

    def _sim_params(self):
        return [] if self.similarity is None else self.similarity.params

    def learned(self) -> dict:
        """The learned tensors by name: pixels, texts, the lrs' parameters, S's."""
        out = {"images": self.images, "texts": self.texts, "lr_image": self.lr_params[0],
               "lr_text": self.lr_params[1]}
        if self.similarity is not None:
            out.update(zip(self.similarity.NAMES[self.similarity.kind], self.similarity.params))
        return out

    def saved_state(self):
        """(pixels, texts, [lr_image, lr_text], S's arrays or None) as a pair set would hold
        them now: the tensors, or with distill.ema their moving average."""
        if self.ema is None:
            return (self.images.detach().cpu().numpy().copy(),     # (not a view on CPU)
                    self.texts.detach().cpu().numpy().copy(),
                    [float(self._lr(i)) for i in range(2)],
                    None if self.similarity is None else self.similarity.arrays())
        a = self.ema.arrays()
        lrs = [torch.as_tensor(a[k]) for k in ("lr_image", "lr_text")]   # as _lr computes
        lrs = [float(v.exp() if self.lr_space == "log" else v) for v in lrs]
        sim = (None if self.similarity is None else
               {k: a[k] for k in self.similarity.NAMES[self.similarity.kind]})
        return a["images"], a["texts"], lrs, sim

    def clipped(self, grads):
        """distill.clip applied to this iteration's meta-gradients (vldd.outer.clip)."""
        return clip(grads, self.curve, [CURVE_COLUMNS.index(c) for c in GRAD_COLUMNS],
                    self.cfg.clip)

    def step(self, grads):
        """One optimiser step of the learned tensors (those distill.learn_* leaves on) with
        the meta-gradients `grads` (clipped by distill.clip); the lrs kept at or above
        distill.lr_min; the moving average updated (distill.ema). Returns the pixels and
        texts before the step and (select best) the saved_state() of then."""
        grads = self.clipped(grads)
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        for p, g in zip((self.images, self.texts, *self.lr_params, *self._sim_params()), grads):
            p.grad = g
        before = (self.images.detach().clone(), self.texts.detach().clone(),
                  self.saved_state() if self.cfg.select == "best" else None)
        for opt, learn in zip(self.optimizers, ("image", "text", "lr", "similarity")):
            if self.learn[learn]:
                opt.step()
        lr_min = self.cfg.lr_min
        if self.learn["lr"] and lr_min is not None:
            # the seed code lets lrs go negative; a floor keeps them usable
            floor = math.log(float(lr_min)) if self.lr_space == "log" else float(lr_min)
            with torch.no_grad():
                for p in self.lr_params:
                    p.clamp_(min=floor)
        if self.ema is not None:
            self.ema.update(self.learned())
        return before

    def record(self, loss, terms, grads, before, where):
        """The curve's row of this iteration; with select best, the best window so far."""
        diag = diagnostics(terms, grads[:4], before[:2], (self.images.detach(),
                                                       self.texts.detach()))
        self.curve.append((self.iteration, loss, float(self.lr_img), float(self.lr_txt),
                           *where, *diag))
        if self.cfg.select == "best" and len(self.curve) >= self.window:
            mean = float(np.mean([row[1] for row in self.curve[-self.window:]]))
            if self.best is None or mean < self.best["loss"]:
                # the state this iteration was scored with (with ema: the average of then),
                # the last of the window
                images, texts, lrs, sim = before[2]
                self.best = {"loss": mean, "iteration": self.iteration, "images": images,
                             "texts": texts, "lrs": lrs, "similarity": sim}
        self.iteration += 1

    def chosen(self):
        """(images, texts, [lr_image, lr_text], S's arrays or None, iteration) of the data to
        save: the last state (with ema its average), or with select best the best window's
        (the last state while no window is complete)."""
        if self.cfg.select == "best" and self.best is not None:
            b = self.best
            return b["images"], b["texts"], b["lrs"], b["similarity"], b["iteration"]
        return (*self.saved_state(), self.iteration)

    def pairset(self):
        images, texts, lrs, sim, iteration = self.chosen()
        if sim is not None and not all(np.isfinite(a).all() for a in sim.values()):
            raise VlddError("the learned similarity matrix holds NaN or inf: lower "
                            "distill.lors.lr_sim.")
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
        if self.covmatch is not None:   # learns no lrs: evaluate trains with evaluate.lr
            lrs = [float("nan")] * 2
        if self.cfg.select == "best":
            log.info("saving the data of iteration %d (select best: mean matching loss %.4f "
                     "over its window of %d iterations)", iteration,
                     self.best["loss"] if self.best else float("nan"), self.window)
        return PairSet(images, texts, self.caption_ids, kind="distilled",
                       method=self.cfg.method, mean=self.mean, std=self.std,
                       lr_image=float(lrs[0]), lr_text=float(lrs[1]),
                       init_images=self.init_images.numpy(), init_texts=self.init_texts.numpy(),
                       attrs={"selected_iteration": int(iteration)},
                       nominal_budget=self.budget,
                       similarity=None if sim is None else {
                           "kind": self.similarity.kind, "alpha": self.similarity.alpha,
                           "arrays": sim})

    def curve_frame(self):
        return pd.DataFrame(self.curve, columns=CURVE_COLUMNS)


def run_phase(data_dir, embeddings_path, model_cfg, phase, device, last: bool):
    """Run (or resume) one phase to its end: its pair set and curve. A phase before the last
    leaves its finished state in its checkpoint, so a rerun after a later phase was killed
    does not redo it."""
    cfg = config.section("distill", phase.cfg)
    key = checkpoint_key(model_cfg, cfg, phase.budget, phase.experts)
    d = Distiller(data_dir, embeddings_path, phase.experts, model_cfg, cfg, phase.budget, device)
    saved = load_distiller(d, phase.checkpoint, key)
    name = f"distill {cfg.method}" + (f" phase {phase.index}" if phase.index or not last else "")
    bar = Progress(cfg.iterations, f"{name} n{phase.budget}", start=d.iteration, log=log)
    while d.iteration < cfg.iterations:
        loss = d.iterate(saved and phase.checkpoint.exists())
        bar.update(1, matching_loss=float(loss), lr_image=float(d.lr_img),
                   lr_text=float(d.lr_txt))
        every = cfg.checkpoint_every
        if (every and d.iteration % every == 0 and d.iteration < cfg.iterations) or \
                (not last and d.iteration == cfg.iterations):
            save_distiller(d, phase.checkpoint, key)
            saved = True
    for t in d.experts:
        t.close()
    return d.pairset(), d.curve_frame()


def distill(data_dir, embeddings_path, expert_paths, model, cfg, budget, out_pairs,
            out_curve, checkpoint=None, device="auto"):
    """Run (or resume) a distillation and write the pair set and the loss/lr curve: the
    paper's loop, one iteration per pass; with distill.phases, one such run per phase
    (vldd.phases). `model` and `cfg` are the model and distill sections (vldd.config's typed
    objects, or dicts)."""
    model_cfg = config.section("model", model).as_dict()
    cfg = config.section("distill", cfg)
    section = {"model": model_cfg, "distill": cfg.as_dict(), "budget": int(budget),
               "experts": [str(p) for p in expert_paths]}
    checkpoint = Path(checkpoint) if checkpoint else Path(str(out_pairs) + ".ckpt.h5")
    plan = phases.plan(cfg, budget, expert_paths, checkpoint)
    done = [run_phase(data_dir, embeddings_path, model_cfg, p, device, p is plan[-1])
            for p in plan]
    prov = provenance("pairset", section, seed=int(cfg.seed),
                      image_encoder=model_cfg["image_encoder"],
                      text_encoder=model_cfg["text_encoder"],
                      data_sha256=config_hash(data_fingerprint(data_dir, embeddings_path)))
    write_pairset(out_pairs, phases.merge([ps for ps, _ in done], budget), prov)
    write_parquet(phases.join_curves([c for _, c in done]), out_curve, meta=prov)
    for p in plan:
        p.checkpoint.unlink(missing_ok=True)
