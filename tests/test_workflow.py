"""The workflow through the real Snakemake CLI: a tiny end-to-end run, the DAG, lint,
single-stage reruns, and a Karpathy-format dataset run with no code change."""
from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir, *args, configfile=TINY, check=True):
    env = dict(os.environ)
    # The jobs run `python -m vldd`: the interpreter running the tests must come first.
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--configfile", str(configfile), "--cores", "2", "--resources", "gpu=2", *args]
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)
    if check and out.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{out.stdout[-4000:]}\n"
                             f"{out.stderr[-4000:]}")
    return out


def job_counts(output: str) -> dict:
    """The 'Job stats' table of a (dry) run as {rule: count}."""
    counts = {}
    block = output.split("Job stats:")[-1] if "Job stats:" in output else output
    for line in block.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


def test_dry_run_lists_the_whole_dag(tmp_path):
    out = snakemake(tmp_path, "-n", "--quiet", "rules")
    assert job_counts(out.stdout + out.stderr) == {
        "prepare_dataset": 1, "embed_captions": 1, "train_expert": 2, "distill": 1,
        "select_coreset": 1, "evaluate": 4, "train_full": 2, "summarize": 1,
        "figure_distilled": 1, "figure_recall": 1, "all": 1}


def test_lint_reports_no_problem(tmp_path):
    out = snakemake(tmp_path, "--lint", check=False)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "Congratulations, your workflow is in a good condition" in text


def test_snakefmt_leaves_every_snakemake_file_unchanged():
    """The Snakefile and the rule files as snakefmt writes them (pyproject [tool.snakefmt]);
    snakefmt is in the `test` extra."""
    import shutil

    exe = shutil.which("snakefmt", path=str(Path(sys.executable).parent)) or \
        shutil.which("snakefmt")
    assert exe, "snakefmt is not installed: pip install -e '.[test]'"
    out = subprocess.run([exe, "--check", "Snakefile", "workflow/rules"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    n = 1 + len(list((REPO / "workflow" / "rules").glob("*.smk")))   # Snakefile + rules
    assert f"{n} file(s) would be left unchanged" in out.stderr + out.stdout


def test_unknown_config_key_is_rejected_before_any_job(tmp_path):
    out = snakemake(tmp_path, "-n", "--config", "distil={iterations: 3}", check=False)
    assert out.returncode != 0
    assert "distil" in out.stderr + out.stdout
    assert not (tmp_path / "results").exists()


def test_tiny_end_to_end_run_writes_every_output(tiny_run):
    base = tiny_run / "results" / "tiny"
    expected = [
        "data/images.h5", "data/captions.parquet", "embeddings/all-MiniLM-L6-v2.h5",
        "experts/tiny-model/expert_0.h5", "experts/tiny-model/expert_1.h5",
        "distilled/tiny-model/mtt/n8/pairs.h5", "distilled/tiny-model/mtt/n8/curve.parquet",
        "coresets/tiny-model/random/n8/pairs.h5",
    ] + [f"eval/tiny-model/{src}/n8/seed{s}.parquet"
         for src in ("distilled-mtt", "coreset-random") for s in (0, 1)] + [
        f"eval/tiny-model/full/seed{s}.parquet" for s in (0, 1)]
    missing = [p for p in expected if not (base / p).is_file()]
    assert not missing
    # No checkpoint or temporary file is left behind by a finished run.
    leftovers = [p.name for p in base.rglob("*") if ".tmp-" in p.name or "ckpt" in p.name]
    assert not leftovers
    curve = pd.read_parquet(base / "distilled/tiny-model/mtt/n8/curve.parquet")
    assert list(curve["iteration"]) == [0, 1, 2, 3]
    assert np.isfinite(curve["matching_loss"]).all()


def test_tiny_run_tables_hold_every_method_with_recalls_in_range(tiny_run):
    table = pd.read_parquet(tiny_run / "results/tables/retrieval.parquet")
    assert set(table["method"]) == {"distilled-mtt", "coreset-random", "full"}
    assert table["value"].between(0, 100).all()
    assert len(table) == 3 * 2 * 6  # methods x seeds x metrics
    md = (tiny_run / "results/tables/retrieval.md").read_text()
    for method in ("distilled-mtt", "coreset-random", "full"):
        assert re.search(rf"\| {method} \|", md)
    assert "+-" in md


def test_forcerun_distill_reruns_distill_and_its_dependents_only(tiny_run):
    out = snakemake(tiny_run, "-n", "--forcerun", "distill", "--quiet", "rules")
    assert job_counts(out.stdout + out.stderr) == {
        "distill": 1, "evaluate": 2, "summarize": 1, "figure_distilled": 1, "figure_recall": 1,
        "all": 1}


def test_figures_render_and_appear_in_the_report(tiny_run):
    figs = [tiny_run / "results/figures/tiny/tiny-model/mtt/n8" / f"{n}.png"
            for n in ("examples", "curve")] + [tiny_run / "results/figures/recall_vs_budget.png"]
    for fig in figs:
        assert fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
    snakemake(tiny_run, "--report", "results/report.html")
    html = (tiny_run / "results/report.html").read_text(errors="replace")
    for name in ("examples.png", "curve.png", "recall_vs_budget.png", "retrieval.md"):
        assert name in html, name


def test_report_rules_run_in_a_venv_built_from_envs_report_yaml(tiny_run, tmp_path_factory):
    """summarize and the figures, rerun by Snakemake with `python` from a fresh venv that
    holds only the packages of envs/report.yaml (no torch), as `--sdm conda` runs them."""
    from test_envs import venv_from_env

    python = venv_from_env(REPO / "envs" / "report.yaml", tmp_path_factory.mktemp("report-env"))
    assert subprocess.run([str(python), "-c", "import torch"], capture_output=True).returncode
    table = tiny_run / "results/tables/retrieval.parquet"
    before = table.stat().st_mtime_ns
    env = dict(os.environ, PATH=str(python.parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--configfile", str(TINY), "--cores", "2", "--forcerun", "summarize",
           "figure_distilled", "figure_recall"]
    out = subprocess.run(cmd, cwd=tiny_run, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    ran = set(re.findall(r"^localrule (\w+):", out.stdout + out.stderr, flags=re.M))
    assert ran == {"summarize", "figure_distilled", "figure_recall", "all"}, ran
    assert table.stat().st_mtime_ns > before
    assert set(pd.read_parquet(table)["method"]) == {"distilled-mtt", "coreset-random", "full"}


@pytest.fixture
def vldd_env_python(tmp_path_factory):
    """The python of a venv built from envs/vldd.yaml; the venv (about 6.4 GB: torch comes
    with its CUDA libraries) is removed after the test, pass or fail."""
    from test_envs import venv_from_env

    dest = tmp_path_factory.mktemp("vldd-env")
    free = shutil.disk_usage(dest).free / 2**30
    if free < 9:
        pytest.skip(f"the envs/vldd.yaml venv needs about 7 GB of disk (torch with its CUDA "
                    f"libraries) and {dest} has {free:.1f} GB free")
    try:
        yield venv_from_env(REPO / "envs" / "vldd.yaml", dest)
    finally:
        shutil.rmtree(dest, ignore_errors=True)


def test_compute_rules_run_in_a_venv_built_from_envs_vldd_yaml(vldd_env_python, tmp_path_factory):
    """The whole tiny workflow, every job run with `python` from a fresh venv that holds only
    the packages of envs/vldd.yaml (no vldd, no snakemake, no pytest), as `--sdm conda` runs
    them. A sitecustomize in that venv records each interpreter start, so the test knows
    which python ran each `python -m vldd` stage rather than assuming it."""
    python = vldd_env_python
    for absent in ("vldd", "snakemake", "pytest"):
        found = subprocess.run([str(python), "-c", f"import {absent}"], capture_output=True)
        assert found.returncode, f"{absent} is importable in the envs/vldd.yaml venv"
    where = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run([str(python), "-c", where], capture_output=True, text=True,
                             check=True).stdout.strip()
    (Path(purelib) / "sitecustomize.py").write_text(
        "import os, sys\n"
        "_m = os.environ.get('VLDD_ENV_MARKER')\n"
        "if _m:\n"
        "    with open(_m, 'a') as f:\n"
        "        f.write(repr((sys.executable, sys.orig_argv)) + '\\n')\n")
    work = tmp_path_factory.mktemp("vldd-env-run")
    marker = work / "interpreters.txt"
    env = dict(os.environ, VLDD_ENV_MARKER=str(marker),
               PATH=str(python.parent) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--configfile", str(TINY), "--cores", "2", "--resources", "gpu=2"]
    out = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    stages = []
    for line in marker.read_text().splitlines():
        executable, argv = ast.literal_eval(line)  # a tuple written by the sitecustomize above
        assert Path(executable).parent == python.parent, executable
        if argv[1:3] == ["-m", "vldd"]:
            stages.append(next(a for a in argv[3:] if not a.startswith("-") and not a.isdigit()))
    # every job of every rule ran its `python -m vldd` stage with the env's interpreter
    command = {"prepare_dataset": "prepare-dataset", "embed_captions": "embed-captions",
               "train_expert": "train-expert", "distill": "distill",
               "select_coreset": "select-coreset", "evaluate": "evaluate",
               "train_full": "train-full", "summarize": "summarize",
               "figure_distilled": "figures", "figure_recall": "figures"}
    expected = Counter()
    for rule, n in job_counts(out.stdout + out.stderr).items():
        if rule != "all":
            expected[command[rule]] += n
    assert Counter(stages) == expected, (stages, expected)
    table = pd.read_parquet(work / "results/tables/retrieval.parquet")
    assert set(table["method"]) == {"distilled-mtt", "coreset-random", "full"}


def test_finished_run_has_nothing_left_to_do(tiny_run):
    out = snakemake(tiny_run, "-n")
    assert "Nothing to be done" in out.stdout + out.stderr
    # where the jobs run is not what they compute: another device plans no job
    out = snakemake(tiny_run, "-n", "--quiet", "rules", "--config", "device=cpu")
    assert job_counts(out.stdout + out.stderr) == {}, out.stdout[-2000:]
    assert "Nothing to be done" in out.stdout + out.stderr


def _karpathy_fixture(root: Path) -> Path:
    """A tiny Karpathy-split dataset: coloured shapes on disk with two captions each."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220),
               "yellow": (230, 220, 40), "white": (250, 250, 250)}
    rng = np.random.default_rng(0)
    (root / "imgs" / "sub").mkdir(parents=True)
    images = []
    for i in range(36):
        name, rgb = list(colours.items())[i % len(colours)]
        arr = np.zeros((24, 24, 3), dtype=np.uint8)
        y, x = rng.integers(0, 12, size=2)
        arr[y:y + 10, x:x + 10] = rgb
        fname = f"img_{i:03d}.png"
        Image.fromarray(arr).save(root / "imgs" / "sub" / fname)
        split = "test" if i >= 28 else ("val" if i >= 24 else ("restval" if i % 7 == 0 else "train"))
        images.append({"filename": fname, "filepath": "sub", "split": split,
                       "sentences": [{"raw": f"A {name} square."},
                                     {"raw": f"a small {name} block on black"}]})
    ann = root / "dataset_tiny.json"
    ann.write_text(json.dumps({"images": images}))
    return ann


def test_karpathy_dataset_runs_through_the_same_workflow(tmp_path):
    ann = _karpathy_fixture(tmp_path / "raw")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["dataset"] = {"name": "karpathy_tiny", "source": "karpathy", "resolution": 16,
                      "karpathy": {"annotations": str(ann), "image_root": str(tmp_path / "raw" / "imgs")}}
    cfg["full"]["enabled"] = False
    cfg["evaluate"]["seeds"] = [0]
    path = tmp_path / "karpathy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, configfile=path)
    table = pd.read_parquet(tmp_path / "results/tables/retrieval.parquet")
    assert set(table["dataset"]) == {"karpathy_tiny"}
    assert set(table["method"]) == {"distilled-mtt", "coreset-random"}
    assert table["value"].between(0, 100).all()
    caps = pd.read_parquet(tmp_path / "results/karpathy_tiny/data/captions.parquet")
    assert (caps["split"] == "test").sum() == 16  # 8 test images x 2 captions
    # the annotation file is prepare_dataset's input: editing it reruns the data stage
    assert job_counts(snakemake(tmp_path, "-n", configfile=path).stdout) == {}
    with ann.open("a") as f:  # new content (a mere touch with equal content reruns nothing)
        f.write("\n")
    out = snakemake(tmp_path, "-n", "--quiet", "rules", configfile=path)
    assert job_counts(out.stdout + out.stderr).get("prepare_dataset") == 1


def test_paper_config_without_its_data_names_the_missing_file(tmp_path):
    out = snakemake(tmp_path, "-n", configfile=REPO / "config" / "flickr30k.yaml", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert ("dataset.karpathy.annotations: data/flickr30k/dataset_flickr30k.json does not "
            "exist") in text
    assert "Download it (README.md" in text and "Job stats" not in text
    assert not (tmp_path / "results").exists()


def test_wrong_type_and_unknown_key_are_named_with_what_is_allowed(tmp_path):
    out = snakemake(tmp_path, "-n", "--config", "distill={iterations: many}",
                    "distil={iterations: 3}", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0
    assert "'distill.iterations': 'many' is not of type 'integer'" in text
    assert "unknown key 'distil'" in text and "distill" in text.split("unknown key 'distil'")[1]
    assert not (tmp_path / "results").exists()


def test_a_number_inside_a_config_mapping_gets_the_configfile_fix(tmp_path):
    """Snakemake passes `--config 'distill={iterations: 3}'` as the text '3': the error says
    so and names --configfile; text that is no number ('many') gets no such hint."""
    out = snakemake(tmp_path, "-n", "--config", "distill={iterations: 3}", check=False)
    text = out.stdout + out.stderr
    assert out.returncode != 0 and not (tmp_path / "results").exists()
    assert "'distill.iterations': '3' is not of type 'integer' (snakemake --config passes" in text
    assert "add it with --configfile" in text
    out = snakemake(tmp_path, "-n", "--config", "distill={iterations: many}", check=False)
    assert out.returncode != 0 and "--configfile, e.g." not in out.stdout + out.stderr


SHELL_SAFE = {"threads", "wildcards.i", "wildcards.n", "wildcards.seed"}  # digits only


def test_every_value_in_a_shell_command_is_quoted():
    """Config values, paths and free-form wildcards reach the shell only through {x:q}."""
    unquoted = []
    for smk in sorted((REPO / "workflow" / "rules").glob("*.smk")):
        for block in re.findall(r"\n    shell:\n((?:        .*\n)+)", smk.read_text()):
            for name, fmt in re.findall(r"\{([\w.\[\]]+)(:\w+)?\}", block):
                if fmt != ":q" and name not in SHELL_SAFE:
                    unquoted.append(f"{smk.name}: {{{name}}}")
    blocks = sum(len(re.findall(r"\n    shell:\n", p.read_text()))
                 for p in (REPO / "workflow" / "rules").glob("*.smk"))
    assert blocks >= 8  # every stage rule was looked at
    assert not unquoted, unquoted


def test_hostile_paths_and_values_never_run_as_shell(tmp_path):
    """A data path full of shell syntax works as a path; a device value with shell syntax is
    refused by the schema before any command runs."""
    raw = tmp_path / "raw dir; touch PWNED1 $(touch PWNED2) `touch PWNED3` it's"
    ann = _karpathy_fixture(raw)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["dataset"] = {"name": "hostile", "source": "karpathy", "resolution": 16,
                      "karpathy": {"annotations": str(ann), "image_root": str(raw / "imgs")}}
    path = tmp_path / "hostile.yaml"
    path.write_text(yaml.safe_dump(cfg))
    snakemake(tmp_path, "--until", "prepare_dataset", configfile=path)
    assert (tmp_path / "results/hostile/data/captions.parquet").exists()
    out = snakemake(tmp_path, "--until", "prepare_dataset", "--config", "device=cpu; touch PWNED4",
                    configfile=path, check=False)
    assert out.returncode != 0 and "'device'" in out.stdout + out.stderr
    assert not list(tmp_path.rglob("PWNED*")) and not list(REPO.glob("PWNED*"))


@pytest.mark.parametrize("paper", ["flickr30k", "coco"])
def test_paper_config_plans_the_papers_experiments(tmp_path, paper):
    """The paper's config, its data pointed at a small Karpathy fixture: 20 experts, a
    distillation per budget, the four coresets per budget, 5 evaluation seeds each, tables."""
    ann = _karpathy_fixture(tmp_path / "raw")
    out = snakemake(tmp_path, "-n", "--quiet", "rules", "--config",
                    f"dataset={{karpathy: {{annotations: '{ann}', "
                    f"image_root: '{tmp_path / 'raw' / 'imgs'}'}}}}",
                    configfile=REPO / "config" / f"{paper}.yaml")
    counts = job_counts(out.stdout + out.stderr)
    budgets, kinds, seeds = 4, 4, 5
    assert counts == {
        "prepare_dataset": 1, "embed_captions": 1, "train_expert": 20, "distill": budgets,
        "select_coreset": kinds * budgets, "evaluate": (budgets + kinds * budgets) * seeds,
        "train_full": seeds, "summarize": 1, "figure_distilled": budgets, "figure_recall": 1,
        "all": 1}, counts


@pytest.mark.parametrize("method", ["lors", "repblend", "ptmst"])
def test_successor_paper_configs_plan_on_the_paper_config(tmp_path, method):
    """config/flickr30k-{lors,repblend}.yaml on config/flickr30k.yaml: one distillation
    (budget 100), the coresets at that budget, 5 evaluation seeds each, 20 experts of its
    model; its settings are the method's scripts'."""
    ann = _karpathy_fixture(tmp_path / "raw")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n",
         "--quiet", "rules", "--cores", "2", "--configfile", str(REPO / "config" / "flickr30k.yaml"),
         str(REPO / "config" / f"flickr30k-{method}.yaml"), "--config",
         f"dataset={{karpathy: {{annotations: '{ann}', image_root: '{tmp_path / 'raw' / 'imgs'}'}}}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    counts = job_counts(out.stdout + out.stderr)
    assert counts["distill"] == 1 and counts["select_coreset"] == 4
    assert counts["evaluate"] == (1 + 4) * 5 and counts["train_expert"] == 20
    cfg = yaml.safe_load((REPO / "config" / f"flickr30k-{method}.yaml").read_text())
    d = cfg["distill"]
    lr, iterations = (1000, 2000) if method == "ptmst" else (100, 3000)
    assert (d["method"], d["engine"], d["mini_batch"], d["lors"]["lr_sim"], d["lr_image"],
            d["iterations"]) == (method, "constant-memory", 20, 10, lr, iterations)
    if method == "ptmst":      # the shortcuts of every expert's epochs 0-6, a full S, an EMA
        assert counts["shortcut_expert"] == 20
        assert (d["shortcut"], d["ema"], d["lors"]["similarity"]) == ([0, 6], 0.99, "full")
    else:
        assert (d["lors"]["rank"], d["lors"]["alpha"]) == (10, 3)
    if method == "repblend":    # the frozen NFNet with two heads: experts of their own
        assert cfg["model"] == {"name": "nfnet_l0-bert-heads", "image_encoder": {
            "name": "nfnet_l0", "weights": "hub", "trainable": "heads"}}
        assert d["repblend"]["alpha"] == 1.0


def test_emoji_benchmark_config_reads_its_data_path_from_config(tmp_path):
    """config/emoji.yaml on the default: the data path is a config value (here a Karpathy
    fixture); budgets 50/100/200, the four coresets, 3 seeds, full data."""
    ann = _karpathy_fixture(tmp_path / "raw")
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "-p",
         "--cores", "2", "--configfile", str(REPO / "config" / "config.yaml"),
         str(REPO / "config" / "emoji.yaml"), "--config",
         f"dataset={{karpathy: {{annotations: '{ann}', image_root: '{tmp_path / 'raw' / 'imgs'}'}}}}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["distill"] == 3 and counts["select_coreset"] == 12
    assert counts["evaluate"] == 5 * 3 * 3 and counts["train_full"] == 3
    prep = json.loads(re.search(r"prepare-dataset --config-json '([^']*)'", text).group(1))
    assert prep["dataset"]["name"] == "emoji" and prep["dataset"]["karpathy"]["annotations"] == str(ann)


def test_ablation_variants_are_more_distillations_that_the_summary_picks_up(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["distill"]["variants"] = {"textonly": {"learn_images": False},
                                  "noiseinit": {"init": {"image": "noise"}}}
    (tmp_path / "ablations.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", configfile=tmp_path / "ablations.yaml")
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["distill"] == 3 and counts["figure_distilled"] == 3
    assert counts["evaluate"] == (3 + 1) * 2  # (3 distillations + 1 coreset) x 2 seeds
    commands = {m: json.loads(re.search(r"--config-json '([^']*)'.*?/mtt" + m + r"/n8/pairs\.h5",
                                        text).group(1))["distill"]
                for m in ("", "_textonly", "_noiseinit")}
    assert commands[""]["learn_images"] is True and commands[""]["method"] == "mtt"
    assert commands["_textonly"]["learn_images"] is False
    assert commands["_textonly"]["method"] == "mtt_textonly"
    assert commands["_noiseinit"]["init"] == {"image": "noise", "text": "real"}
    for c in commands.values():  # keys that only say which jobs exist stay out of the settings
        assert "variants" not in c and "budgets" not in c
    bad = snakemake(tmp_path, "-n", "--config", "distill={variants: {x: {learn_image: false}}}",
                    check=False)
    assert bad.returncode != 0
    assert "distill.variants.x: unknown key(s) learn_image" in bad.stdout + bad.stderr
    # a value of the wrong type (here the string 'false' that --config makes of false)
    bad = snakemake(tmp_path, "-n", "--config", "distill={variants: {x: {learn_images: false}}}",
                    check=False)
    assert bad.returncode != 0
    assert ("distill.variants.x.learn_images: 'false' is not of type 'boolean'"
            in bad.stdout + bad.stderr)


def test_cross_architecture_evaluations_are_planned_per_distilled_set(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["evaluate"]["cross_architectures"] = {
        "resnet18": {"name": "resnet18", "weights": "none"},
        "lite1": {"name": "tf_efficientnet_lite1", "weights": "none", "trainable": "last:1"}}
    (tmp_path / "cross.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "-p", configfile=tmp_path / "cross.yaml")
    text = out.stdout + out.stderr
    counts = job_counts(text)
    assert counts["evaluate_cross"] == 2 * 2 and counts["evaluate"] == 4  # archs x seeds
    configs = [json.loads(c) for c in re.findall(r"--config-json '([^']*)'", text)]
    encoders = {c["model"]["image_encoder"]["name"] for c in configs
                if "image_encoder" in c.get("model", {})}
    assert encoders == {"tf_efficientnet_lite0", "resnet18", "tf_efficientnet_lite1"}
    assert "cross-lite1/distilled-mtt/n8/seed1.parquet" in text


def test_tables_include_adds_other_runs_to_the_ablation_tables(tiny_run):
    """Another encoder pair is another run (another model name); `tables.include` brings its
    evaluations into this run's tables."""
    from vldd.stages.evaluate import _frame
    from vldd.metrics import METRIC_ORDER
    from vldd.io import provenance, write_parquet

    other = {"name": "vit-lora", "text_encoder": {"name": "all-MiniLM-L6-v2", "pooling": "mean"},
             "image_encoder": {"name": "vit_tiny_patch16_224", "trainable": "lora",
                               "lora": {"rank": 4}}}
    for seed in (0, 1):
        metrics = {m: 20.0 + seed for m in METRIC_ORDER}
        write_parquet(_frame(metrics, "tiny", "distilled-mtt", 8, seed, "evaluate", "vit-lora"),
                      tiny_run / f"other/results/tiny/eval/vit-lora/distilled-mtt/n8/seed{seed}"
                      ".parquet",
                      meta=provenance("eval", {"model": other, "evaluate": {}}, seed=seed))
    # the other run's folder, so that this run's results/ stays as the workflow wrote it
    include = "tables={include: ['other/results/tiny/eval/vit-lora/**/*.parquet']}"
    out = snakemake(tiny_run, "-n", "--quiet", "rules", "--config", include)
    # only the tables (and the figure drawn from them) are redone; no job of the other run
    assert job_counts(out.stdout + out.stderr) == {"summarize": 1, "figure_recall": 1, "all": 1}
    snakemake(tiny_run, "--config", include)
    md = (tiny_run / "results/tables/ablations.md").read_text()
    enc = md[md.index("Encoders and LoRA"):]
    assert "| vit-lora: vit_tiny_patch16_224 (LoRA r4) + all-MiniLM-L6-v2 (mean) | 2 | 20.5 +- 0.7" \
        in enc
    assert "| tiny-model: tf_efficientnet_lite0 (" in enc
    table = pd.read_parquet(tiny_run / "results/tables/retrieval.parquet")
    assert {"tiny-model", "vit-lora"} <= set(table["model"])
    bad = snakemake(tiny_run, "-n", "--config", "tables={include: ['results/nope/*.parquet']}",
                    check=False)
    assert bad.returncode != 0
    assert "tables.include: 'results/nope/*.parquet' matches no file" in bad.stdout + bad.stderr
    cyclic = snakemake(tiny_run, "-n", "--config", "tables={include: ['results/**/*.parquet']}",
                       check=False)
    assert cyclic.returncode != 0
    assert "a table this workflow writes" in cyclic.stdout + cyclic.stderr
    assert (tiny_run / "results/tables/retrieval.parquet").is_file()


def test_ptmst_500_pair_config_plans_its_two_phases_shortcuts(tmp_path):
    """config/flickr30k-ptmst-500.yaml on the paper's and PTM-ST's 100-pair files: one
    distillation of two phases (200 pairs against epochs 0-6, 299 against epochs 0-8), the
    shortcuts of both windows for each of the 20 experts."""
    ann = _karpathy_fixture(tmp_path / "raw")
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    files = [str(REPO / "config" / f"flickr30k{f}.yaml") for f in ("", "-ptmst", "-ptmst-500")]
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "-n", "-p",
         "--cores", "2", "--configfile", *files, "--config",
         f"dataset={{karpathy: {{annotations: '{ann}', image_root: '{tmp_path / 'raw' / 'imgs'}'}}}}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-3000:]
    counts = job_counts(text)
    assert counts["distill"] == 1 and counts["shortcut_expert"] == 40
    assert "shortcut_0_6/expert_19.h5" in text and "shortcut_0_8/expert_19.h5" in text
    assert "distilled/nfnet_l0-bert/ptmst/n500/pairs.h5" in text
    d = yaml.safe_load(Path(files[2]).read_text())["distill"]
    assert [(p["share"], p["shortcut"], p["min_start_epoch"], p["max_start_epoch"],
             p["iterations"]) for p in d["phases"]] == [(200, [0, 6], 0, 2, 2000),
                                                         (299, [0, 8], 1, 3, 2000)]
    assert d["mini_batch"] == 40


@pytest.mark.parametrize("paper", ["flickr30k", "coco"])
def test_paper_configs_keep_the_papers_outer_optimisation_over_the_default(paper):
    """Snakemake loads config/config.yaml first and the paper's file on top: the default's
    Adam, log-lrs and 4-epoch targets must not leak into the paper's method."""
    def merge(a, b):
        out = dict(a)
        for k, v in b.items():
            out[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return out

    cfg = merge(yaml.safe_load((REPO / "config" / "config.yaml").read_text()),
                yaml.safe_load((REPO / "config" / f"{paper}.yaml").read_text()))
    d = cfg["distill"]
    assert (d["optimizer"], d["lr_space"], d.get("segments", 1)) == ("sgd", "linear", 1)
    assert (d["select"], d["clip"]) == ("last", None)
    assert (d["syn_steps"], d["expert_epochs"], d["max_start_epoch"]) == (8, 1, 2)
    assert (d["lr_lr"], d["lr_init"], d["momentum"], d["lr_min"]) == (0.01, 0.1, 0.5, None)
    assert d["lr_image"] >= 1000 and d["lr_text"] >= 1000
    assert cfg["dataset"]["resolution"] == 224
