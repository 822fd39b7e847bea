"""distill.engine auto (vldd.engines.memory): the exact engine's predicted peak against its
measured peak at three settings, the choice it makes for the default config and for the
paper's Flickr30K config on a 24 GB budget, and a distillation that runs with auto."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from vldd.engines import Unroll
from vldd.engines.memory import choose_engine, exact_graph, exact_peak

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))   # the benchmark's problem (64 px, Lite0)

# One exact iteration in a fresh process: its peak resident memory above the state after
# setup (VmHWM reset to the RSS then, as benchmarks/harness.py measures), and the model's
# prediction made in another process (so that the probe's own allocations do not count).
CHILD = r"""
import json, sys
sys.path[:0] = [sys.argv[1] + "/benchmarks", sys.argv[1] + "/workflow"]
import torch, harness, unroll
from unroll_problem import Setup, make_problem
from vldd.engines import Unroll, meta_gradient
from vldd.engines.memory import exact_graph, exact_peak
trainable, k, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
torch.set_num_threads(1)
args = unroll.parse(["--trainable", trainable])
if mode == "make":
    make_problem(args, sys.argv[5])
    sys.exit(0)
s = Setup(args, sys.argv[5])
u = Unroll(s.model, s.layouts, s.theta0, s.target, syn_steps=k, mini_batch=args.mini_batch,
           scale=1 / 0.07, gen=torch.Generator().manual_seed(0))
if mode == "predict":
    fixed, step = exact_graph(u, s.pixels, s.texts, s.lr_img, s.lr_txt)
    print(json.dumps({"mb": exact_peak(fixed, step, k) / 2**20}))
else:
    base = harness.reset_peak(s.dev)
    meta_gradient("exact", u, s.pixels, s.texts, s.lr_img, s.lr_txt)
    print(json.dumps({"mb": harness.peak(s.dev) - base}))
"""


def _child(tmp_path, trainable, k, mode):
    """mode make: write the problem; predict / measure: the model's or the measured peak in
    MB. Each in its own process, as benchmarks/harness.py does: memory that an earlier step
    freed stays in the process's heap and would hide part of the peak."""
    out = subprocess.run([sys.executable, "-c", CHILD, str(ROOT), trainable, str(k), mode,
                          str(tmp_path / f"problem-{trainable.replace(':', '')}.pt")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return None if mode == "make" else json.loads(out.stdout.strip().splitlines()[-1])["mb"]


@pytest.mark.parametrize("trainable,k", [("heads", 2), ("last:1", 8), ("all", 2)])
def test_the_memory_model_predicts_the_exact_engines_measured_peak(tmp_path, trainable, k):
    """Three settings (the frozen-encoder heads, the default last:1 at the default syn_steps,
    the whole encoder): the prediction is within 25% of the measured peak."""
    _child(tmp_path, trainable, k, "make")
    predicted = _child(tmp_path, trainable, k, "predict")
    measured = _child(tmp_path, trainable, k, "measure")
    assert measured > 100                   # a real graph, not noise
    assert abs(predicted / measured - 1) < 0.25, (predicted, measured)


def _graph(model_cfg, distill_cfg, n, resolution, text_dim):
    """(fixed, per step) of the exact engine's graph for a random student and random pairs
    of this model, n pairs at `resolution`, the config's mini_batch (at most n)."""
    from vldd.model import build_model
    from vldd.train import train_mode

    model = build_model(model_cfg, text_dim, seed=0)
    train_mode(model)
    layouts = model.layouts()
    flat = {g: torch.cat([p.detach().reshape(-1) for p in mod.parameters() if p.requires_grad])
            for g, mod in (("image", model.tail), ("text", model.head))}
    target = {g: v + 0.01 for g, v in flat.items()}
    u = Unroll(model, layouts, flat, target, syn_steps=int(distill_cfg["syn_steps"]),
               mini_batch=min(n, int(distill_cfg["mini_batch"])), scale=1 / 0.07,
               gen=torch.Generator().manual_seed(0))
    pixels = torch.randn(n, 3, resolution, resolution, requires_grad=True)
    texts = torch.randn(n, text_dim, requires_grad=True)
    lrs = [torch.tensor(0.1, requires_grad=True) for _ in range(2)]
    return exact_graph(u, pixels, texts, *lrs)


def test_auto_picks_exact_for_the_default_config_and_checkpointed_for_flickr30k_at_24_gb():
    """The default config (Lite0, last:1, 64 px, 50 pairs, syn_steps 8) is measured at its
    own size. The paper's Flickr30K config (NFNet-L0 trained whole, 224 px, 100 pairs,
    mini_batch 100, syn_steps 8) cannot be built on a CI machine: its graph is measured with
    8 pairs at 64 px (random weights: the graph's size does not depend on them) and scaled
    by pixels x pairs (a convolutional network's activations grow with both)."""
    from vldd import config

    default = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    model = config.section("model", default["model"]).as_dict()
    dist = config.section("distill", default["distill"]).as_dict()
    fixed, step = _graph(model, dist, int(default["distill"]["budgets"][0]),
                         default["dataset"]["resolution"],
                         384)
    engine, why = choose_engine(exact_peak(fixed, step, dist["syn_steps"]), 24 * 2**30)
    assert engine == "exact", why

    paper = yaml.safe_load((ROOT / "config" / "flickr30k.yaml").read_text())
    pm = config.section("model", paper["model"]).as_dict()
    pm["image_encoder"] = {**pm["image_encoder"], "weights": "none"}
    pd_ = config.section("distill", paper["distill"]).as_dict()
    fixed, step = _graph(pm, {**pd_, "mini_batch": 8}, 8, 64, 768)
    scale = (224 / 64) ** 2 * (100 / 8)
    predicted = exact_peak(fixed * scale, step * scale, pd_["syn_steps"])
    engine, why = choose_engine(predicted, 24 * 2**30)
    assert engine == "checkpointed", why
    assert predicted > 24 * 2**30     # not by the margin alone


def test_a_distillation_with_auto_resolves_its_engine_by_the_budget(store, caplog):
    from conftest import DISTILL, MODEL
    from vldd.stages.distill import Distiller

    picked = {}
    for budget in (1e-6, 100.0):
        with caplog.at_level("INFO"):
            d = Distiller(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL,
                          {**DISTILL, "engine": "auto", "memory_budget_gb": budget}, 6, "cpu")
        picked[budget] = d.engine
        d.iterate()
    assert picked == {1e-6: "checkpointed", 100.0: "exact"}
    assert "distill.engine auto: checkpointed" in caplog.text


# A small unroll-like workload (4 convolutions on 4 MiB activations, gradient with
# create_graph, then its gradient): page faults of iterations 3 to 5.
FAULTS = r"""
import resource, torch
torch.manual_seed(0)
w = [(0.05 * torch.randn(64, 64, 3, 3)).requires_grad_(True) for _ in range(4)]
x = torch.randn(16, 64, 32, 32)
def once():
    h = x
    for wi in w:
        h = torch.nn.functional.conv2d(h, wi, padding=1).relu()
    gs = torch.autograd.grad(h.square().mean(), w, create_graph=True)
    torch.autograd.grad(sum(g.square().sum() for g in gs), w)
once(); once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc variables")
def test_heap_env_keeps_freed_memory_without_page_faults():
    """vldd.heap: with HEAP_ENV an unroll-like loop takes (almost) no page faults once it has
    run; with glibc's defaults every iteration faults much of its memory in anew (measured:
    about 63,000 faults over 3 iterations). set_heap_env keeps a value the user set."""
    import os

    from vldd.heap import HEAP_ENV, set_heap_env

    plain = {k: v for k, v in os.environ.items() if k not in HEAP_ENV}
    counts = {}
    for name, env in (("default", plain), ("heap", set_heap_env(dict(plain)))):
        out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True,
                             text=True, check=True)
        counts[name] = int(out.stdout.split()[-1])
    assert counts["default"] > 10000, counts
    assert counts["heap"] < counts["default"] / 20, counts
    assert set_heap_env({"MALLOC_TOP_PAD_": "1"})["MALLOC_TOP_PAD_"] == "1"
