"""The report stages run without torch: `python -m vldd summarize` and `figures`, as the
report rules call them, in a Python where `import torch` (and the other deep-learning
packages of envs/vldd.yaml) fails, as in envs/report.yaml."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import DISTILL, MODEL
from vldd.stages.distill import distill
from vldd.stages.evaluate import _frame
from vldd.metrics import METRIC_ORDER
from vldd.io import write_parquet

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "timm", "transformers", "peft", "safetensors",
           "sentence_transformers")

BLOCKER = f"""
import sys

class _Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ImportError(f"{{name}} is not in the report env")
        return None

sys.meta_path.insert(0, _Blocker())
"""


def run_without_torch(tmp_path: Path, *args):
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{REPO / 'workflow'}")
    return subprocess.run([sys.executable, "-m", "vldd", *args], env=env, capture_output=True,
                          text=True, timeout=300)


def test_the_blocker_blocks(tmp_path):
    out = run_without_torch(tmp_path, "train-expert", "--data", "x", "--embeddings", "y",
                            "--index", "0", "--out", "z", "--config-json",
                            '{"model": {}, "experts": {}}')
    assert out.returncode != 0 and "torch is not in the report env" in out.stderr


def test_summarize_and_figures_run_where_torch_cannot_be_imported(store, tmp_path):
    evals = []
    for method in ("distilled-mtt", "coreset-random"):
        for seed in (0, 1):
            path = tmp_path / f"{method}_{seed}.parquet"
            write_parquet(_frame({m: 10.0 + seed for m in METRIC_ORDER}, "t", method, 6, seed,
                                 "evaluate", "m"), path, meta={"schema": "vldd/eval"})
            evals.append(str(path))
    d = tmp_path
    out = run_without_torch(tmp_path, "summarize", "--inputs", *evals, "--out-parquet",
                            str(d / "table.parquet"), "--out-md", str(d / "table.md"),
                            "--out-ablations", str(d / "ablations.md"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "| distilled-mtt |" in (d / "table.md").read_text()

    distill(store / "data", store / "emb.h5", [store / "expert_0.h5"], MODEL, DISTILL, 6,
            d / "pairs.h5", d / "curve.parquet", device="cpu")
    out = run_without_torch(
        tmp_path, "figures", "--data", str(store / "data"), "--embeddings",
        str(store / "emb.h5"), "--pairs", str(d / "pairs.h5"), "--curve",
        str(d / "curve.parquet"), "--table", str(d / "table.parquet"), "--out-examples",
        str(d / "ex.png"), "--out-curve", str(d / "curve.png"), "--out-recall",
        str(d / "recall.png"))
    assert out.returncode == 0, out.stderr[-3000:]
    for name in ("ex.png", "curve.png", "recall.png"):
        assert (d / name).read_bytes()[:4] == b"\x89PNG", name


@pytest.mark.parametrize("module", ["vldd.stages.summarize", "vldd.stages.figures", "vldd.cli"])
def test_report_modules_import_no_deep_learning_package(module):
    code = f"import json, sys, {module}; print(json.dumps(sorted(set(sys.modules))))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=str(REPO / "workflow")), timeout=120)
    assert out.returncode == 0, out.stderr
    top = {name.split(".")[0] for name in json.loads(out.stdout)}
    assert not top & set(BLOCKED), sorted(top & set(BLOCKED))


OUTER = """configfile: "my.yaml"


module vldd:
    snakefile:
        {snakefile!r}
    config:
        config


use rule * from vldd
"""


def test_the_workflow_runs_as_a_module_of_another_workflow(tmp_path):
    """Another project's Snakefile imports vldd with `module`: the schema and the package
    are found from vldd's own files, not from the outer Snakefile's directory."""
    (tmp_path / "Snakefile").write_text(OUTER.format(snakefile=str(REPO / "Snakefile")))
    (tmp_path / "my.yaml").write_text((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", "--workflow-profile", "none"]
    out = subprocess.run([*cmd, "-n", "--quiet", "rules"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    for rule in ("prepare_dataset", "train_expert", "distill", "evaluate", "summarize"):
        assert re.search(rf"^{rule}\s+\d+$", text, flags=re.M), (rule, text[-3000:])
    # one real job: `python -m vldd` finds the package through the module's PYTHONPATH
    out = subprocess.run([*cmd, "--until", "prepare_dataset"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert (tmp_path / "results" / "tiny" / "data" / "images.h5").is_file()
