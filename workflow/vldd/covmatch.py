"""CovMatch (Lee and Chung, NeurIPS 2025, arXiv 2510.18583): distillation without an unroll.

For a linear contrastive model on top of fixed features (Nakada et al., 2023), the loss is
-tr(G_I C G_T^T) plus a regulariser on G_I^T G_T, where C is the cross-covariance of the
paired image and text features: its minimiser depends on the data only through C. So a
distilled set whose cross-covariance equals the real data's trains the same linear model, and
the bi-level problem becomes a matching of second moments:

    L = |C_real - C_syn|_F^2 + w * (|mu_I,real - mu_I,syn|^2 + |mu_T,real - mu_T,syn|^2)

with C = (1/n) sum_i (z_I,i - mu_I)(z_T,i - mu_T)^T over L2-normalised features z, and the
second term the regulariser of each modality's features (their means). With
distill.covmatch.features joint, z are the joint-space embeddings of a model that is trained
online on real pairs as the distillation goes (distill.covmatch.online_steps SGD steps per
iteration) and restarted from a fresh initialisation every distill.covmatch.reset_every
iterations, so the data is matched under models from every stage of training; both towers'
trained parts (the image tail and the text head) learn. With features encoder, z are what
those trained parts read (the frozen trunk's output, pooled over space, and the sentence
embeddings): the closed form's own setting when the trained parts are the projection heads
(model.image_encoder.trainable heads). No expert trajectory is read.

The paper's text encoder is a full transformer fine-tuned with the rest; here, as in every
vldd method, the captions are cached sentence embeddings and the text head is what trains.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import load_optimizers, save_optimizers
from .config import filled
from .errors import VlddError
from .io import h5_dataset
from .model import build_model, logit_scale
from .realdata import RealData
from .train import sgd_optimizer, train_epoch, train_mode
from .trajectory import flatten


def cross_covariance(img: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(1/n) sum_i (img_i - mean)(txt_i - mean)^T of paired rows [n, d]."""
    img = img - img.mean(0, keepdim=True)
    txt = txt - txt.mean(0, keepdim=True)
    return img.t() @ txt / len(img)


def covmatch_loss(real: tuple, syn: tuple, feature_weight: float, terms: dict | None = None):
    """|C_real - C_syn|_F^2 + feature_weight * (the squared distances of the two modalities'
    feature means); real and syn are (image features, text features), L2-normalised here.
    `terms`, when a dict, receives the three parts (detached)."""
    ri, rt = (F.normalize(x, dim=-1) for x in real)
    si, st = (F.normalize(x, dim=-1) for x in syn)
    cov = (cross_covariance(ri, rt) - cross_covariance(si, st)).pow(2).sum()
    mean_i = (ri.mean(0) - si.mean(0)).pow(2).sum()
    mean_t = (rt.mean(0) - st.mean(0)).pow(2).sum()
    if terms is not None:
        terms.update(covariance=cov.detach(), image=mean_i.detach(), text=mean_t.detach())
    return cov + feature_weight * (mean_i + mean_t)


class CovMatch:
    """The online model, its real pairs and its optimiser; segment() is the Distiller's
    iteration step for distill.method covmatch."""

    def __init__(self, real: RealData, text_dim: int, model_cfg, cfg, device):
        """real: the training split's pairs (features of the model's frozen trunk)."""
        self.model_cfg, self.cfg, self.dev = model_cfg, cfg, device
        self.c = cfg.covmatch
        trainable = filled("model", model_cfg)["image_encoder"]["trainable"]
        if self.c.features == "encoder" and trainable in ("all", "lora"):
            raise VlddError(
                f"distill.covmatch.features encoder matches the statistics of the frozen "
                f"image trunk's output, and model.image_encoder.trainable {trainable} leaves "
                "no frozen trunk (the features would be the raw pixels). Use features: joint, "
                "or trainable heads or last:k.")
        self.real, self.text_dim = real, text_dim
        self.scale = logit_scale(model_cfg)   # of the online training (InfoNCE)
        self.resets = -1
        self._reset(0)
        self.gen = torch.Generator().manual_seed(int(cfg.seed))
        self.steps = 0

    def _reset(self, k: int):
        """Model k: a fresh initialisation from its own seed (distill.seed and k)."""
        seed = int(np.random.SeedSequence([int(self.cfg.seed), k]).generate_state(1)[0] >> 1)
        with torch.random.fork_rng(devices=[]):   # build_model seeds the global generator
            self.model = build_model(self.model_cfg, self.text_dim, seed).to(self.dev)
        self.opt = sgd_optimizer(self.model, float(self.c.lr_image), float(self.c.lr_text),
                                 float(self.c.momentum), 0.0)
        self.resets = k

    def _batch(self):
        n = len(self.real.pair_img)
        return torch.randperm(n, generator=self.gen)[:min(int(self.c.real_batch), n)]

    def _features(self, trunk_out, texts):
        """The features whose statistics are matched: the model's joint-space embeddings
        (features joint), or what its trained parts read (features encoder: the frozen
        trunk's output, averaged over space if it is a map, and the sentence embeddings)."""
        if self.c.features == "encoder":
            flat = trunk_out.mean((2, 3)) if trunk_out.dim() == 4 else trunk_out
            return flat.flatten(1), texts
        return self.model.tail(trunk_out), self.model.head(texts)

    def segment(self, iteration: int, images, texts):
        """(model index, online steps so far, loss, terms, [d images, d texts, None, None]):
        the CovMatch loss of the distilled pairs under the current model and its gradient;
        then the model's online training steps on real pairs."""
        joint = self.c.features == "joint"    # else the features do not depend on the model
        k = iteration // int(self.c.reset_every) if joint else 0
        if k != self.resets:
            self._reset(k)
        m, real = self.model, self.real
        ids = self._batch()
        m.tail.eval()
        m.head.eval()
        with torch.no_grad():
            ref = self._features(real.feats[real.pair_img[ids]], real.texts[real.pair_txt[ids]])
        syn = self._features(m.tower.trunk(images), texts)
        terms = {}
        loss = covmatch_loss(ref, syn, float(self.c.feature_weight), terms)
        grads = torch.autograd.grad(loss, [images, texts])
        for _ in range(int(self.c.online_steps) if joint else 0):
            train_mode(m)
            train_epoch(m, self.opt, self._batch(), real.feats, real.texts, real.pair_img,
                        real.pair_txt, int(self.c.real_batch), self.scale, None)
            self.steps += 1
        return k, self.steps, float(loss.detach()), terms, [*grads, None, None]

    # ------------------------------------------------------------------ checkpointing

    def _trained(self):
        return [p for mod in (self.model.tail, self.model.head) for p in mod.parameters()
                if p.requires_grad]

    def save(self, f) -> None:
        g = f.create_group("covmatch")
        h5_dataset(g, "params", flatten(self._trained()).cpu().numpy())
        h5_dataset(g, "gen", self.gen.get_state().numpy())
        g.attrs["resets"], g.attrs["steps"] = self.resets, self.steps
        save_optimizers(g, [self.opt])

    def load(self, f) -> None:
        g = f["covmatch"]
        self._reset(int(g.attrs["resets"]))
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.as_tensor(g["params"][()]).to(self.dev), self._trained())
        self.gen.set_state(torch.as_tensor(g["gen"][()]))
        self.steps = int(g.attrs["steps"])
        load_optimizers(g, [self.opt])
