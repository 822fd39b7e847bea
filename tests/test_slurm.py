"""The cluster path through a real Slurm: `snakemake --profile slurm` with the project's
profile, every non-local job submitted with sbatch and seen COMPLETED by sacct.

It needs a Slurm that answers (`.ci/local-slurm.sh up --gpus 2` brings one up on a Debian
machine as root; CI does that before `make test`) and the executor plugin (the `slurm`
extra). Without them the test skips and says why, unless VLDD_REQUIRE_SLURM=1 (CI), where a
missing Slurm is a failure.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
LOCAL_RULES = {"all", "summarize", "figure_distilled", "figure_recall"}


def _slurm_missing() -> str | None:
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return "no sbatch/sinfo on PATH (bring one up with `.ci/local-slurm.sh up --gpus 2`)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if out.returncode != 0 or not re.search(r"idle|mix|alloc", out.stdout):
        return f"no Slurm node is up (sinfo: {(out.stdout + out.stderr).strip()[:200]})"
    try:
        import snakemake_executor_plugin_slurm  # noqa: F401
    except ImportError:
        return "snakemake-executor-plugin-slurm is not installed (pip install 'vldd[slurm]')"
    return None


@pytest.fixture(scope="module")
def slurm():
    why = _slurm_missing()
    if why:
        if os.environ.get("VLDD_REQUIRE_SLURM") == "1":
            pytest.fail(f"VLDD_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)


def ci_profile(dest: Path) -> Path:
    """The project's profiles/slurm with the site-specific values filled in for the local
    one-node cluster, as a user fills the FILL placeholders for theirs."""
    prof = yaml.safe_load((REPO / "profiles" / "slurm" / "config.yaml").read_text())
    prof.pop("software-deployment-method", None)  # no conda here: the jobs use this venv
    prof["jobs"] = 4
    prof["latency-wait"] = 5
    prof["retries"] = 0
    prof["slurm-init-seconds-before-status-checks"] = 2  # first status poll after 2 s
    prof["slurm-keep-successful-logs"] = True
    prof["default-resources"] = {"slurm_partition": "debug", "slurm_account": "root",
                                 "runtime": 10, "mem_mb": 1000}
    for res in prof["set-resources"].values():
        res.update(slurm_partition="debug", mem_mb=2000, runtime=10)
    # the one node has as many CPUs as this machine: a thread per job (CPUs asked = threads)
    prof["set-threads"] = {rule: 1 for rule in prof["set-threads"]}
    folder = dest / "slurm"
    folder.mkdir()
    (folder / "config.yaml").write_text(yaml.safe_dump(prof, sort_keys=False))
    return folder


def test_every_job_goes_through_sbatch_and_finishes(slurm, tmp_path):
    ci_profile(tmp_path)
    cfg = yaml.safe_load(TINY.read_text())
    cfg["evaluate"]["seeds"] = [0]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # `--profile slurm` as a user types it who copied profiles/slurm to a profile folder named
    # slurm (here ./slurm in the working directory; ~/.config/snakemake/slurm works alike).
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"),
           "--configfile", "config.yaml", "--profile", "slurm"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=1200)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]

    # "Job 3 has been submitted with SLURM jobid 17 (log: ...)."
    submitted = re.findall(r"Job (\d+) has been submitted with SLURM jobid (\d+)", log)
    slurm_ids = sorted({int(s) for _, s in submitted})
    print(f"\nsbatch job ids: {slurm_ids}")
    # prepare 1, embed 1, experts 2, full 1, coreset 1, distill 1, evaluate 2: 9 Slurm jobs,
    # one sbatch each; only the cheap rules ran in the snakemake process itself.
    assert len(slurm_ids) == len({j for j, _ in submitted}) == 9, log[-6000:]
    assert set(re.findall(r"^localrule (\w+):", log, flags=re.M)) == LOCAL_RULES, log[-6000:]
    remote = re.findall(r"^rule (\w+):", log, flags=re.M)
    assert sorted(remote) == sorted(["prepare_dataset", "embed_captions", "train_expert",
                                     "train_expert", "train_full", "select_coreset", "distill",
                                     "evaluate", "evaluate"]), remote
    assert (tmp_path / "results" / "tables" / "retrieval.parquet").exists()

    # Slurm's own account of them: each COMPLETED, each under the rule's name as comment.
    acct = subprocess.run(
        ["sacct", "-n", "-X", "-P", "-o", "JobID,State,Comment", "-j",
         ",".join(map(str, slurm_ids))], capture_output=True, text=True, timeout=60)
    if acct.returncode == 0 and acct.stdout.strip():
        states = {int(line.split("|")[0]): line.split("|")[1]
                  for line in acct.stdout.strip().splitlines()}
        assert set(states) == set(slurm_ids), acct.stdout
        assert set(states.values()) == {"COMPLETED"}, acct.stdout
    # and a per-job log that the plugin kept, named by the Slurm job id
    logs = list((tmp_path / ".snakemake" / "slurm_logs").rglob("*.log"))
    assert {int(p.stem) for p in logs} >= set(slurm_ids)

    table = pd.read_parquet(tmp_path / "results" / "tables" / "retrieval.parquet")
    assert set(table["method"]) >= {"distilled-mtt", "coreset-random", "full"}
