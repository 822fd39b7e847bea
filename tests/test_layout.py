"""The package's shape (issue "Renovation"): a library below, one module per stage above, the
schema as the one source of config defaults, small files and functions."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from vldd import config

PACKAGE = Path(__file__).resolve().parents[1] / "workflow" / "vldd"
STAGES = PACKAGE / "stages"
STAGE_MODULES = {"prepare_dataset", "embed_captions", "train_expert", "shortcut_expert", "distill",
                 "select_coreset", "evaluate", "summarize", "figures", "inspect"}


def _modules():
    return sorted(PACKAGE.rglob("*.py"))


def _imported(path: Path) -> set[str]:
    """Absolute names of the vldd modules `path` imports (relative imports resolved)."""
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            mod = ".".join(base + ([node.module] if node.module else []))
            out.add(mod)
            out.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m == "vldd" or m.startswith("vldd.")}


def test_the_stage_modules_are_the_rules_stages():
    assert {p.stem for p in STAGES.glob("*.py")} - {"__init__"} == STAGE_MODULES
    rules = {p.stem for p in (PACKAGE.parent / "rules").glob("*.smk")} - {"common"}
    assert rules == STAGE_MODULES - {"inspect"}   # inspect is a CLI verb, not a rule


def test_a_stage_imports_only_the_library_and_only_cli_imports_stages():
    for path in _modules():
        stages = {m for m in _imported(path) if m.startswith("vldd.stages.")
                  and m.split(".")[2] in STAGE_MODULES}
        if path.parent == STAGES:
            assert stages <= {f"vldd.stages.{path.stem}"}, (path.name, stages)
        elif path.name != "cli.py":
            assert not stages and "vldd.stages" not in _imported(path), (path.name, stages)


def _violations(paths):
    """(files over 350 lines, functions over 60 lines, engine signatures over 6 params)."""
    long_files, long_functions, wide = [], [], []
    for path in paths:
        src = path.read_text()
        if len(src.splitlines()) > 350:
            long_files.append(path.name)
        for node in ast.walk(ast.parse(src)):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.name}")
            a = node.args
            names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
            n = len(names) + bool(a.vararg) + bool(a.kwarg) - (names[:1] in (["self"], ["cls"]))
            if "engines" in path.parts and n > 6:
                wide.append(f"{path.name}:{node.name} ({n})")
    return long_files, long_functions, wide


def test_no_file_over_350_lines_no_function_over_60_no_engine_signature_over_6():
    assert _violations(_modules()) == ([], [], [])


def test_the_size_check_sees_a_long_function_and_a_wide_engine_signature(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(60))
    (tmp_path / "engines").mkdir()
    bad = tmp_path / "engines" / "m.py"
    bad.write_text(f"def f():\n{body}\n\n\ndef g(self, a, b, c, d, e, f):\n    pass\n")
    ok = tmp_path / "engines" / "n.py"
    ok.write_text("def g(self, a, b, c, d, e, f=1):\n    pass\n".replace(", f=1", ""))
    assert _violations([bad, ok]) == ([], ["m.py:f"], [])
    bad.write_text("def g(a, b, c, d, e, f, h):\n    pass\n" + "\n" * 350)
    assert _violations([bad]) == (["m.py"], [], ["m.py:g (7)"])


@pytest.mark.parametrize("module", ["vldd.stages.summarize", "vldd.stages.figures", "vldd.cli"])
def test_the_report_stages_import_no_torch(module):
    """summarize and figures run in envs/report.yaml, which has no torch: importing them (and
    the CLI that calls them) with torch made unimportable must work and load no torch."""
    code = textwrap.dedent(f"""
        import importlib.abc, sys
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked")
        sys.meta_path.insert(0, Block())
        import {module}
        from vldd.stages import summarize, figures
        assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(PACKAGE.parent), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def _schema_defaults(node: dict):
    """Independently of vldd.config: every default of a schema object, recursively."""
    props = node.get("properties")
    if not props:
        return node.get("default")
    return {k: _schema_defaults(v) for k, v in props.items()
            if "default" in v or "properties" in v}


@pytest.mark.parametrize("verb", sorted(config.STAGE_SECTIONS))
def test_each_stages_config_objects_from_an_empty_config_are_the_schemas_defaults(verb):
    schema = yaml.safe_load(config.SCHEMA.read_text())
    required, optional = config.STAGE_SECTIONS[verb]
    objects = config.stage_config(verb, {name: {} for name in required + optional})
    assert set(objects) == set(required + optional)
    for name, obj in objects.items():
        assert dataclasses.is_dataclass(obj) and dataclasses.fields(obj)
        want = _schema_defaults(schema["properties"][name])
        for key in config.FANOUT.get(name, ()):
            want.pop(key)
        assert obj.as_dict() == want, name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, dataclasses.fields(obj)[0].name, None)


def test_a_stage_config_keeps_what_it_is_given_and_lacks_a_required_section():
    got = config.stage_config("distill", {"model": {}, "distill": {
        "iterations": 3, "init": {"text": "noise"}, "lr_min": None}})
    assert got["distill"].iterations == 3 and got["distill"].init.text == "noise"
    assert got["distill"].lr_min is None                # null given is not the default 0.01
    assert got["distill"].init.image == "real"          # the schema's default beside it
    assert not hasattr(got["distill"], "budgets")       # fan-out keys are not a stage's
    with pytest.raises(config.VlddError, match="lacks the section 'distill'"):
        config.stage_config("distill", {"model": {}})


def test_no_config_default_is_written_in_the_stages():
    """Stages read their typed sections; a `.get("key", default)` on a config section would
    be a second source of defaults (annotation entries and file attributes are not config)."""
    for path in STAGES.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.endswith("cfg")):
                pytest.fail(f"{path.name}:{node.lineno}: {ast.unparse(node)}")


def _schema_keys(node: dict) -> set:
    out = set()
    for key, sub in (node.get("properties") or {}).items():
        out |= {key} | _schema_keys(sub)
    return out


def test_no_config_default_is_written_in_the_library():
    """Nowhere in the package but vldd/config.py does a `.get("<config key>", default)` write a
    default of its own (an empty '' / {} / None fallback for a file's metadata is not one):
    the library fills partial settings from the schema (config.filled)."""
    keys = _schema_keys(yaml.safe_load(config.SCHEMA.read_text()))
    found = []
    for path in _modules():
        if path.name == "config.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "get" and len(node.args) == 2
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value in keys
                    and ast.unparse(node.args[1]) not in ("''", "{}", "None", "'{}'")):
                found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
    assert found == []


def test_the_library_fills_partial_settings_with_the_schemas_defaults():
    from vldd.encoders.weights import text_location
    from vldd.engines import EngineOptions
    from vldd.model import logit_scale

    schema = yaml.safe_load(config.SCHEMA.read_text())
    model = _schema_defaults(schema["properties"]["model"])
    distill = _schema_defaults(schema["properties"]["distill"])
    assert logit_scale({}) == 1.0 / model["temperature"]
    assert logit_scale({"temperature": 0.5}) == 2.0
    opts = EngineOptions.from_config({})
    assert (opts.autocast, opts.tf32, opts.channels_last, opts.segment) == (
        distill["autocast"], distill["tf32"], distill["channels_last"], distill["segment_steps"])
    # the schema's text weights are a package: a partial spec loads it, not the hub
    assert model["text_encoder"]["weights"].startswith("package:")
    assert text_location({}) == text_location({"weights": model["text_encoder"]["weights"]})
    assert text_location({}) != text_location({"weights": "hub"})
