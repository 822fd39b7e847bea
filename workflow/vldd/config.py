"""Configuration: the schema is the one place a setting and its default are written.

workflow/schemas/config.schema.yaml types every key and holds every default. This module
reads it and nothing else to

- check a config (every problem at once, each naming its key and what is allowed there);
- fill in the defaults of a section (`fill`), as Snakemake's validation does for the workflow;
- resolve the distill variants (`variant_section`) and drop the fan-out keys, which only say
  which jobs exist (`stage_section`: adding a budget or a seed must not rerun other jobs);
- hand each stage its sections as typed objects (`typed`): frozen dataclasses whose fields are
  the schema's properties, built from the filled section, so no stage writes a default.

Needs only pyyaml (and jsonschema for `problems`): Snakemake and both environments have them.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
import re
from pathlib import Path

from .errors import VlddError

# distill.method: the algorithm a label runs (a variant's label <method>_<name> runs its main
# method's); any other label runs the paper's (vldd.outer)
ALGORITHMS = ("mtt", "lors", "repblend", "ptmst", "covmatch")
# the algorithms that read no expert trajectory
WITHOUT_EXPERTS = ("covmatch",)


def algorithm(method: str) -> str:
    for name in ALGORITHMS:
        if method == name or method.startswith(f"{name}_"):
            return name
    return "mtt"


SCHEMA = Path(__file__).resolve().parents[1] / "schemas" / "config.schema.yaml"
FIX = "config/README.md describes every key."

# Keys that only decide which jobs exist, per section: the stages never read them, so they are
# not part of what a job computes (nor of its params, nor of its outputs' provenance).
FANOUT = {"experts": ("count",), "distill": ("budgets", "variants"), "coresets": ("kinds",),
          "evaluate": ("seeds", "cross_architectures"), "full": ("enabled",)}
# Coreset kinds that embed the pairs with a trained expert (its final parameters).
CORESET_NEEDS_EXPERT = ("herding", "kcenter")


@functools.cache
def schema() -> dict:
    import yaml
    return yaml.safe_load(SCHEMA.read_text())


def node(path: str) -> dict:
    """The schema of a dotted key path, e.g. 'model.text_encoder'."""
    out = schema()
    for key in path.split("."):
        out = out["properties"][key]
    return out


# ----------------------------------------------------------------------------- checking


def _text_hint(err) -> str:
    """For a type error on text that YAML reads as the wanted type (what `--config
    'distill={iterations: 3}'` makes of 3: Snakemake passes values inside a mapping as text),
    the fix; empty otherwise."""
    import jsonschema
    import yaml

    if err.validator != "type" or not isinstance(err.instance, str):
        return ""
    try:
        jsonschema.validate(yaml.safe_load(err.instance), {"type": err.validator_value})
    except (yaml.YAMLError, jsonschema.ValidationError):
        return ""
    return (" (snakemake --config passes values inside a mapping as text: put nested settings "
            "in a YAML file and add it with --configfile, e.g. snakemake --configfile "
            "config/config.yaml my.yaml)")


def problems(cfg: dict) -> list[str]:
    """Every schema violation of a whole config, each naming its key and what is allowed."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema())
    out = []
    for err in sorted(cls(schema()).iter_errors(cfg), key=lambda e: list(map(str, e.path))):
        where = ".".join(map(str, err.absolute_path))
        if err.validator == "additionalProperties":
            known = sorted(err.schema.get("properties", {}))
            for key in sorted(set(err.instance) - set(known)):
                name = f"{where}.{key}" if where else key
                scope = f"in {where}" if where else "at the top level"
                out.append(f"unknown key '{name}'; the keys allowed {scope} are: "
                           f"{', '.join(known)}")
        else:
            out.append(f"'{where or '(top level)'}': {err.message}{_text_hint(err)}")
    return out


def variant_problems(variants: dict) -> list[str]:
    """distill.variants: names usable in paths, keys that are distill keys, values of their
    type."""
    import jsonschema

    props = {k: v for k, v in node("distill")["properties"].items()
             if k not in ("budgets", "variants", "method")}
    out = []
    for name, over in (variants or {}).items():
        if not re.fullmatch(r"[A-Za-z0-9]+", name):
            out.append(f"distill.variants: name '{name}' must be letters and digits only (it "
                       "becomes part of the method name and of paths).")
            continue
        bad = sorted(set(over or {}) - set(props))
        if bad:
            out.append(f"distill.variants.{name}: unknown key(s) {', '.join(bad)}; a variant "
                       f"overrides distill keys: {', '.join(sorted(props))}.")
        for key, value in (over or {}).items():
            if key in props:
                try:
                    jsonschema.validate(value, props[key])
                except jsonschema.ValidationError as err:
                    out.append(f"distill.variants.{name}.{key}: {err.message}"
                               f"{_text_hint(err)}")
    return out


# ----------------------------------------------------------------------------- defaults


_MISSING = object()


def fill(path: str, value=_MISSING, drop=()):
    """The value at `path` (e.g. 'distill') with every schema default filled in, recursively;
    the keys in `drop` (of the top level) left out. A key given as null stays null; free-form
    objects are kept as given."""
    return _fill(node(path), value if value is _MISSING else copy.deepcopy(value), drop)


def filled(path: str, value) -> dict:
    """The settings at `path` as a plain dict with the schema's defaults: from a stage's typed
    section (its as_dict()) or a partial dict (a test, a benchmark, an older file's config)."""
    if dataclasses.is_dataclass(value):
        value = value.as_dict()
    return fill(path, {} if value is None else value)


def _fill(spec: dict, value, drop=()):
    props = spec.get("properties")
    if value is _MISSING:
        if not props:
            return copy.deepcopy(spec.get("default"))
        value = copy.deepcopy(spec.get("default") or {})
    if props is None or not isinstance(value, dict):
        return value
    out = dict(value)
    for key, sub in props.items():
        if key in drop:
            out.pop(key, None)
        elif key in out:
            out[key] = _fill(sub, out[key])
        elif "default" in sub or "properties" in sub:
            out[key] = _fill(sub, _MISSING)
    return out


def stage_section(cfg: dict, name: str) -> dict:
    """Section `name` of a whole config as a stage reads it: filled, without fan-out keys."""
    return fill(name, cfg.get(name, _MISSING), FANOUT.get(name, ()))


def variant_section(cfg: dict, method: str) -> dict:
    """The distill settings of `method`: the main one (distill.method), or a variant
    `<method>_<name>` (distill.variants.<name> on top of it; `init` merges per modality)."""
    base = stage_section(cfg, "distill")
    main = base["method"]
    variants = (cfg.get("distill") or {}).get("variants") or {}
    if method == main:
        return base
    name = method[len(main) + 1:]
    if not method.startswith(f"{main}_") or name not in variants:
        known = [main] + [f"{main}_{v}" for v in variants]
        raise VlddError(f"no distillation method '{method}': known are {known}.")
    merged = json.loads(json.dumps(base))
    for key, value in (variants[name] or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    merged["method"] = method
    return merged


# ----------------------------------------------------------------------------- typed


_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list,
          "object": dict, "null": type(None)}


@functools.cache
def section_class(path: str, drop: tuple = ()) -> type:
    """The frozen dataclass of the schema object at `path`: one field per property (but the
    `drop` keys), nested objects with properties as their own classes. It carries no
    defaults: `typed` fills them from the schema."""
    fields = []
    for key, sub in node(path)["properties"].items():
        if key in drop:
            continue
        if "properties" in sub:
            kind = section_class(f"{path}.{key}")
        else:
            names = sub.get("type", "object")
            kinds = [_TYPES[n] for n in ([names] if isinstance(names, str) else names)]
            kind = kinds[0] if len(kinds) == 1 else " | ".join(k.__name__ for k in kinds)
        fields.append((key, kind))
    name = "".join(part.title().replace("_", "") for part in path.split(".")) + "Config"
    return dataclasses.make_dataclass(name, fields, frozen=True,
                                      namespace={"as_dict": dataclasses.asdict})


def typed(path: str, value: dict | None, drop=()):
    """Section `path` as its dataclass, defaults from the schema; the `drop` keys (fan-out
    keys the stage does not read) are absent from the object, so its as_dict() is exactly
    the section a rule passes."""
    return _build(path, fill(path, _MISSING if value is None else value, drop), tuple(drop))


def _build(path: str, filled: dict, drop=()):
    cls = section_class(path, drop)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if isinstance(f.type, type) and dataclasses.is_dataclass(f.type):
            kwargs[f.name] = _build(f"{path}.{f.name}", filled[f.name])
        else:
            if f.name not in filled:
                raise VlddError(f"config {path}.{f.name} is required (it has no default). "
                                f"{FIX}")
            kwargs[f.name] = filled[f.name]
    return cls(**kwargs)


def section(name: str, value):
    """Section `name` for a stage: its typed object as is, or a dict (a partial section from
    Python code or a test) typed with the schema's defaults, fan-out keys dropped."""
    if dataclasses.is_dataclass(value):
        return value
    return typed(name, value, FANOUT.get(name, ()))


# The config sections each CLI verb reads (--config-json), the first ones required.
STAGE_SECTIONS = {
    "prepare-dataset": (("dataset",), ()),
    "embed-captions": (("model",), ()),
    "train-expert": (("model", "experts"), ()),
    "distill": (("model", "distill"), ()),
    "select-coreset": (("model", "coresets"), ("experts",)),
    "evaluate": (("model", "evaluate"), ()),
    "train-full": (("model", "full"), ()),
}


def stage_config(verb: str, cfg: dict) -> dict:
    """The typed sections of stage `verb` from its --config-json: each required one must be
    there (a rule always passes it), the optional ones are None when absent."""
    required, optional = STAGE_SECTIONS[verb]
    out = {}
    for name in required + optional:
        if name not in cfg:
            if name in required:
                raise VlddError(f"--config-json lacks the section '{name}'.")
            out[name] = None
            continue
        out[name] = section(name, cfg[name])
    return out


# ----------------------------------------------------------------------------- specs


def text_spec(spec: dict) -> dict:
    """What identifies a text encoder's embeddings: its keys, defaults filled."""
    filled = fill("model.text_encoder", spec)
    return {"name": filled["name"], "weights": filled["weights"], "pooling": filled["pooling"],
            "normalize": bool(filled["normalize"]), "max_length": int(filled["max_length"])}


def lora_spec(spec: dict | None) -> dict:
    """A LoRA spec (model.image_encoder.lora) with its defaults filled in (a null value
    means the default)."""
    spec = dict(spec or {})
    known = node("model.image_encoder.lora")["properties"]
    unknown = sorted(set(spec) - set(known))
    if unknown:
        raise VlddError(f"model.image_encoder.lora: unknown keys {unknown}; known are "
                        f"{sorted(known)}.")
    out = fill("model.image_encoder.lora", {k: v for k, v in spec.items() if v is not None})
    if int(out["rank"]) < 1:
        raise VlddError(f"model.image_encoder.lora.rank must be >= 1, not {out['rank']}.")
    if not 0.0 <= float(out["dropout"]) < 1.0:
        raise VlddError(f"model.image_encoder.lora.dropout must be in [0, 1), not "
                        f"{out['dropout']}.")
    return out
