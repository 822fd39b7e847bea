"""profiles/slurm as Snakemake reads it: the dry run of every rule with the profile shows a
partition that follows the job's GPU request and threads equal to the CPUs it asks for.

No Slurm is needed: the dry run prints each job's threads and resources as the executor plugin
would submit them (tests/test_slurm.py submits them to a real Slurm when one is up)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
LOCAL_RULES = {"all", "summarize", "figure_distilled", "figure_recall"}  # not submitted
# every rule of the workflow on: the four coresets, a cross-architecture, a variant, full data
EVERYTHING = {
    "coresets": {"kinds": ["random", "herding", "kcenter", "forgetting"]},
    "evaluate": {"seeds": [0], "cross_architectures": {
        "resnet18": {"name": "resnet18", "weights": "none"}}},
    "distill": {"variants": {"textonly": {"learn_images": False},
                             "short": {"shortcut": [0, 3]}}},
    "full": {"enabled": True},
}


def jobs_of_dry_run(text: str) -> list[dict]:
    """[{rule, local, threads, resources, shell_threads}] from `snakemake -n -p` output
    (a dry run prints local rules as `rule` too: `local` comes from the rule files)."""
    jobs = []
    for block in re.split(r"\n(?=\[[^\]]+\]\n(?:local)?rule )", text):
        m = re.search(r"^(local)?rule (\w+):", block, flags=re.M)
        if not m:
            continue
        threads = re.search(r"^\s+threads: (\d+)", block, flags=re.M)
        res = re.search(r"^\s+resources: (.*)$", block, flags=re.M)
        shell = re.search(r"python -m vldd --threads (\d+)", block)
        jobs.append({
            "rule": m.group(2), "local": m.group(2) in local_rules(),
            "threads": int(threads.group(1)) if threads else 1,
            "resources": dict(kv.split("=", 1) for kv in res.group(1).split(", "))
            if res else {},
            "shell_threads": int(shell.group(1)) if shell else None})
    return jobs


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("slurm-dry")
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    assert prof.pop("software-deployment-method") == "conda"  # no conda here to ask
    (work / "slurm").mkdir()
    (work / "slurm" / "config.yaml").write_text(yaml.safe_dump(prof))
    (work / "everything.yaml").write_text(yaml.safe_dump(EVERYTHING))
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # --cores: a dry run caps threads at the local cores; Slurm jobs are not capped so.
    out = subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
         "--configfile", str(TINY), "everything.yaml", "--workflow-profile",
         str(work / "slurm"), "-n", "-p", "--cores", "256"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    return prof, jobs_of_dry_run(out.stdout + out.stderr)


def local_rules() -> set:
    """`localrule: True` rules, and `all` (no command: Snakemake never submits it)."""
    text = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    blocks = re.split(r"^(?=rule )", text, flags=re.M)
    return {re.match(r"rule (\w+):", b).group(1) for b in blocks
            if b.startswith("rule ") and re.search(r"^    localrule: True", b, flags=re.M)} | {"all"}


def all_rules() -> set:
    text = "".join(p.read_text() for p in (REPO / "workflow" / "rules").glob("*.smk"))
    return set(re.findall(r"^rule (\w+):", text, flags=re.M)) | {"all"}


def test_every_rule_is_in_the_dry_run_and_every_cluster_rule_is_sized(dry_run):
    prof, jobs = dry_run
    assert {j["rule"] for j in jobs} == all_rules()
    remote = {j["rule"] for j in jobs if not j["local"]}
    assert local_rules() == LOCAL_RULES
    assert remote == all_rules() - LOCAL_RULES
    assert remote <= set(prof["set-threads"]), remote - set(prof["set-threads"])
    gpu_rules = {j["rule"] for j in jobs if int(j["resources"].get("gpu", 0)) > 0}
    assert gpu_rules <= set(prof["set-resources"]), gpu_rules - set(prof["set-resources"])


def test_partition_follows_the_gpu_request(dry_run):
    _, jobs = dry_run
    wrong = [(j["rule"], j["resources"].get("slurm_partition"), j["resources"].get("gpu"))
             for j in jobs if not j["local"]
             and j["resources"].get("slurm_partition")
             != ("gpu" if int(j["resources"].get("gpu", 0)) > 0 else "cpu")]
    assert not wrong, wrong
    coresets = {j["resources"]["slurm_partition"] for j in jobs if j["rule"] == "select_coreset"}
    assert coresets == {"cpu", "gpu"}  # random on the CPU partition, the others on GPUs


def test_threads_are_the_cpus_asked_and_what_torch_gets(dry_run):
    """No cpus_per_gpu / cpus_per_task: the plugin then asks --cpus-per-task={threads}."""
    _, jobs = dry_run
    for j in jobs:
        if j["local"]:
            continue
        assert not {"cpus_per_gpu", "cpus_per_task"} & set(j["resources"]), j
        assert j["shell_threads"] == j["threads"], j
    threads = {j["rule"]: j["threads"] for j in jobs if not j["local"]}
    assert threads["train_expert"] == threads["distill"] == 8 and threads["evaluate"] == 4
