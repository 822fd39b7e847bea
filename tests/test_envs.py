"""The conda environments of the rules, and pyproject.toml: one tested set of versions.

Conda itself is not available here. What is checked instead: every package an env file pins,
read as its pip name, is installed in the venv the tests run in at a version the pin admits
(so the pins are the tested versions); the pins lie inside pyproject's ranges; the env's pip
section needs nothing that conda does not already pin (pip would otherwise install or
replace packages under conda's feet). tests/test_workflow.py also builds each env file as a
venv (`venv_from_env`) and runs the rules that use it there: the whole tiny workflow in the
envs/vldd.yaml venv, the report rules in the envs/report.yaml one, where torch is absent.
"""
from __future__ import annotations

import importlib.metadata as md
import platform
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
ENVS = sorted((REPO / "envs").glob("*.yaml"))
# conda-forge names whose PyPI distribution is called otherwise
CONDA_TO_PYPI = {"pytorch": "torch", "matplotlib-base": "matplotlib"}
NOT_PYPI = {"python", "pip"}


def env_requirements(path: Path) -> dict:
    """{pip name: (SpecifierSet, from pip section?)} of an env file; conda's `name =2.4`
    (any 2.4.x) reads as pip's `name==2.4.*`; python is left out (see `python_pin`)."""
    env = yaml.safe_load(path.read_text())
    out = {}
    for dep in env["dependencies"]:
        if isinstance(dep, str):
            m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\s*=\s*([0-9][0-9.]*))?", dep.strip())
            assert m, f"{path.name}: cannot read the conda spec '{dep}'"
            name, version = m.groups()
            if name in NOT_PYPI:
                continue
            assert version, f"{path.name}: {name} is not pinned"
            pip = canonicalize_name(CONDA_TO_PYPI.get(name, name))
            out[pip] = (SpecifierSet(f"=={version}.*"), False)
        else:
            for item in dep.get("pip", []):
                req = Requirement(item)
                out[canonicalize_name(req.name)] = (req.specifier, True)
    return out


def python_pin(path: Path) -> str:
    for dep in yaml.safe_load(path.read_text())["dependencies"]:
        if isinstance(dep, str) and dep.split()[0] == "python":
            return dep.split("=", 1)[1].strip()
    raise AssertionError(f"{path.name} does not pin python")


def pip_specs(path: Path) -> list[str]:
    """The env file as pip requirement strings (what a venv built from it installs)."""
    return [f"{name}{spec}" for name, (spec, _) in sorted(env_requirements(path).items())]


def venv_from_env(path: Path, dest: Path) -> Path:
    """A fresh venv (no system site-packages) holding exactly the packages of an env file,
    at its pins; returns its python. Fails with pip's own words if pip cannot install them."""
    subprocess.run([sys.executable, "-m", "venv", str(dest)], check=True, timeout=300)
    python = dest / "bin" / "python"
    out = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *pip_specs(path)],
                         capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        pytest.fail(f"pip could not build {path.name} as a venv:\n{out.stderr[-3000:]}")
    return python


def pyproject_requirements() -> dict:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in meta["dependencies"]]
    for extra in meta.get("optional-dependencies", {}).values():
        reqs += [Requirement(r) for r in extra]
    return {canonicalize_name(r.name): r for r in reqs}


def installed(name: str) -> Version | None:
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_uses_conda_forge_only_and_pins_every_package(path):
    env = yaml.safe_load(path.read_text())
    assert env["channels"] == ["conda-forge", "nodefaults"]
    assert len(env_requirements(path)) >= 4  # every line was read (and is pinned)


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_are_the_versions_the_tests_run_with(path):
    wrong = []
    for name, (spec, _) in env_requirements(path).items():
        have = installed(name)
        if have is None or have not in spec:
            wrong.append(f"{name}: pinned {spec}, the tests run with {have}")
    assert platform.python_version() in SpecifierSet(f"=={python_pin(path)}.*")
    assert not wrong, f"{path.name}: " + "; ".join(wrong)


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_env_pins_and_pyproject_ranges_are_the_same_release_series(path):
    reqs = pyproject_requirements()
    checked = 0
    for name, (spec, _) in env_requirements(path).items():
        if name not in reqs:
            continue
        pin = str(next(iter(spec)).version).rstrip(".*")
        parts = [int(x) for x in pin.split(".")]
        beyond = Version(".".join(map(str, parts[:-1] + [parts[-1] + 1])))  # next series
        assert reqs[name].specifier.contains(Version(pin), prereleases=True), \
            f"{path.name}: {name} {spec} lies below pyproject's {reqs[name]}"
        assert not reqs[name].specifier.contains(beyond, prereleases=True), \
            f"pyproject's {reqs[name]} admits {beyond}, beyond {path.name}'s {name} {spec}"
        checked += 1
    assert checked >= 4


def test_pyproject_ranges_hold_the_installed_versions():
    """What the venv runs with is what pyproject allows: the core dependencies all
    installed and inside their ranges, and so is every extra that is installed."""
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    core = {canonicalize_name(Requirement(r).name) for r in meta["dependencies"]}
    wrong = []
    for name, req in pyproject_requirements().items():
        have = installed(name)
        if have is None and name not in core:
            continue
        if have is None or not req.specifier.contains(have, prereleases=True):
            wrong.append(f"{req} but installed {have}")
    assert not wrong, wrong


@pytest.mark.parametrize("path", ENVS, ids=lambda p: p.name)
def test_pip_section_needs_nothing_that_conda_does_not_pin(path):
    """Each pip-section package's own requirements are pinned in the conda part at versions
    they accept, so pip installs that package alone (it once pulled sentence-transformers,
    which replaced the conda-pinned transformers 4.57 by 5.x)."""
    reqs = env_requirements(path)
    problems = []
    for name in [n for n, (_, from_pip) in reqs.items() if from_pip]:
        assert installed(name), f"{name} (pip section of {path.name}) is not installed"
        for text in md.requires(name) or []:
            dep = Requirement(text)
            if dep.marker and not dep.marker.evaluate({"extra": ""}):
                continue
            dep_name = canonicalize_name(dep.name)
            if dep_name not in reqs:
                problems.append(f"{name} requires {dep}, which {path.name} does not pin")
            elif not dep.specifier.contains(installed(dep_name), prereleases=True):
                problems.append(f"{name} requires {dep}; {path.name} pins {reqs[dep_name][0]}")
    assert not problems, problems


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
