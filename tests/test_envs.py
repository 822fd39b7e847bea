"""The conda environments of the rules (conda itself is not available here: checked statically)."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}


def pyproject_requirements() -> dict:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return {r.name.lower(): r for r in reqs}


def conda_pins(env: dict) -> dict:
    pins = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            m = re.match(r"^([A-Za-z0-9_.-]+)\s*=?=?\s*([0-9][0-9.*]*)?", dep)
            pins[m.group(1).lower()] = m.group(2)
        elif isinstance(dep, dict):
            for item in dep.get("pip", []):
                req = Requirement(item)
                pins[req.name.lower()] = str(next(iter(req.specifier)).version)
    return pins


ENVS = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_uses_conda_forge_only_and_pins_every_package(path):
    env = yaml.safe_load(path.read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    for name, version in conda_pins(env).items():
        assert name == "pip" or version, f"{path.name}: {name} is not pinned"


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_versions_agree_with_pyproject(path):
    reqs = pyproject_requirements()
    checked = 0
    for name, version in conda_pins(yaml.safe_load(path.read_text())).items():
        req = reqs.get(CONDA_TO_PYPI.get(name, name))
        if req is None or not version:
            continue
        assert Version(version.rstrip(".*")) in req.specifier or \
            req.specifier.contains(version.rstrip(".*") + ".0"), f"{path.name}: {name} {version} vs {req}"
        checked += 1
    assert checked >= 3


def test_every_rule_names_an_existing_env():
    rules = list((REPO / "workflow" / "rules").glob("*.smk"))
    named = set()
    for smk in rules:
        for rel in re.findall(r'conda:\s*\n\s*"([^"]+)"', smk.read_text()):
            target = (smk.parent / rel).resolve()
            assert target.is_file(), f"{smk.name}: conda env {rel} does not exist"
            named.add(target.name)
        n_rules = len(re.findall(r"^rule \w+:", smk.read_text(), flags=re.M))
        n_conda = len(re.findall(r"^\s+conda:", smk.read_text(), flags=re.M))
        assert n_conda == n_rules, f"{smk.name}: {n_rules} rules but {n_conda} conda envs"
    assert named == {p.name for p in ENVS}
