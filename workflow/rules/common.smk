# Configuration, paths and the few helpers the rules share. Rules hold no logic.

import json
import re
import sys
from pathlib import Path
from shlex import quote as shlex_quote

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Paths of this checkout from the directory of this file (workflow/rules), not from
# workflow.basedir, which is the directory of the outermost Snakefile: the workflow then also
# works as a module of another one (`module vldd` with snakefile pointing here).
PACKAGE_DIR = Path(str(workflow.current_basedir)).parent  # the folder of vldd and schemas
sys.path.insert(0, str(PACKAGE_DIR))

from vldd.config import (  # noqa: E402  (schema, defaults, variants: one place)
    CORESET_NEEDS_EXPERT,
    FANOUT,
    WITHOUT_EXPERTS,
    algorithm,
    problems,
    stage_section,
    variant_problems,
    variant_section,
)
from vldd.errors import VlddError  # noqa: E402
from vldd.heap import set_heap_env  # noqa: E402
from vldd.inputs import annotation_files, included_tables  # noqa: E402

# every job's C heap keeps what it frees (vldd.heap: no page faults per iteration)
set_heap_env()


def check_config(cfg):
    """Every schema violation at once, each naming its key and what is allowed there, before
    Snakemake's own validation fills in the defaults."""
    found = problems(cfg)
    if found:
        raise WorkflowError(
            "invalid configuration (config/README.md describes every key):\n  - "
            + "\n  - ".join(found)
        )


check_config(config)
validate(config, schema="../schemas/config.schema.yaml")

DATASET = config["dataset"]["name"]
MODEL = config["model"]["name"]
TEXT = re.sub(r"[^A-Za-z0-9_.-]+", "_", config["model"]["text_encoder"]["name"])
EXPERTS = list(range(config["experts"]["count"]))
BUDGETS = config["distill"]["budgets"]
METHOD = config["distill"]["method"]
# Ablations: each distill.variants entry is another distillation (method <method>_<name>) with
# some distill keys overridden, at every budget, evaluated and tabled like the main one.
VARIANTS = config["distill"].get("variants", {})
METHODS = [METHOD] + [f"{METHOD}_{name}" for name in VARIANTS]
KINDS = config["coresets"]["kinds"]
SEEDS = config["evaluate"]["seeds"]
# Cross-architecture evaluation: distilled sets also trained and tested with these encoders.
CROSS = config["evaluate"].get("cross_architectures", {})

# The package runs from this checkout, inside whatever Python the job has (a venv or the
# conda env of the rule), so no install of vldd itself is needed.
PYTHONPATH = shlex_quote(str(PACKAGE_DIR))
shell.prefix(f"export PYTHONPATH={PYTHONPATH}" "${{PYTHONPATH:+:$PYTHONPATH}}; ")


wildcard_constraints:
    dataset=r"[A-Za-z0-9_.-]+",
    model=r"[A-Za-z0-9_.-]+",
    text=r"[A-Za-z0-9_.-]+",
    i=r"\d+",
    n=r"\d+",
    seed=r"\d+",
    method=r"[A-Za-z0-9_]+",
    kind=r"[A-Za-z0-9_]+",
    arch=r"[A-Za-z0-9_.-]+",
    source=r"(distilled|coreset)-[A-Za-z0-9_]+",


def section(name):
    """A config section as its stage reads it, without the keys that only say which jobs
    exist (adding a budget or a seed must not rerun the jobs that already exist)."""
    return stage_section(config, name)


def check_variants():
    found = variant_problems(VARIANTS)
    if found:
        raise WorkflowError(found[0])


check_variants()


def distill_section(method):
    """The distill settings of `method`: the main one, or a variant's overrides on top."""
    try:
        return variant_section(config, method)
    except VlddError as err:
        raise WorkflowError(str(err)) from None


# The torch device reaches the jobs as a resource ({resources.device:q}), not as a param of
# the rules: where a job runs is not what it computes, so another device reruns nothing.
DEVICE = config["device"]


def stage_json(**sections):
    """The settings a stage reads, as canonical JSON: rule params (so a change reruns
    exactly the jobs it affects) and the CLI's --config-json."""
    return json.dumps(sections, sort_keys=True, separators=(",", ":"))


def dataset_sources():
    """The annotation files prepare_dataset reads, as its input (editing one reruns it)."""
    prepared = all(Path(f).exists() for f in data_files().values())
    try:
        return annotation_files(config["dataset"], prepared)
    except VlddError as err:
        raise WorkflowError(str(err)) from None


def data_files(dataset=DATASET):
    return {
        "images": f"results/{dataset}/data/images.h5",
        "captions": f"results/{dataset}/data/captions.parquet",
    }


def embeddings_file(dataset=DATASET):
    return f"results/{dataset}/embeddings/{TEXT}.h5"


def expert_files(wildcards):
    """The experts a distillation matches: as trained, or their shortcut trajectories over
    the window distill.shortcut of its method (PTM-ST), or those of each of its phases'
    windows (distill.phases); none for CovMatch."""
    section = distill_section(wildcards.method)
    if algorithm(section["method"]) in WITHOUT_EXPERTS:
        return []
    windows = [{**section, **phase}["shortcut"] for phase in section["phases"] or [{}]]
    folders = [f"shortcut_{w[0]}_{w[1]}/" if w else "" for w in windows]
    return expand(
        "results/{dataset}/experts/{model}/{folder}expert_{i}.h5",
        dataset=wildcards.dataset,
        model=wildcards.model,
        folder=list(dict.fromkeys(folders)),
        i=EXPERTS,
    )


def coreset_expert(wildcards):
    """herding and kcenter embed the pairs with expert 0; random and forgetting need none."""
    if wildcards.kind in CORESET_NEEDS_EXPERT:
        return f"results/{wildcards.dataset}/experts/{wildcards.model}/expert_0.h5"
    return []


def coreset_json(wildcards):
    """The settings select_coreset reads; forgetting trains with the experts' settings."""
    sections = {"model": config["model"], "coresets": section("coresets")}
    if wildcards.kind == "forgetting":
        sections["experts"] = section("experts")
    return stage_json(**sections)


def pairset_file(wildcards):
    """The pair set an evaluation trains on: distilled-<method> or coreset-<kind>."""
    family, name = wildcards.source.split("-", 1)
    folder = "distilled" if family == "distilled" else "coresets"
    return f"results/{wildcards.dataset}/{folder}/{wildcards.model}/{name}/n{wildcards.n}/pairs.h5"


def eval_files():
    out = expand(
        "results/{dataset}/eval/{model}/{source}/n{n}/seed{seed}.parquet",
        dataset=DATASET,
        model=MODEL,
        source=[f"distilled-{m}" for m in METHODS] + [f"coreset-{k}" for k in KINDS],
        n=BUDGETS,
        seed=SEEDS,
    )
    out += expand(
        "results/{dataset}/eval/{model}/cross-{arch}/distilled-{method}/n{n}/seed{seed}.parquet",
        dataset=DATASET,
        model=MODEL,
        arch=list(CROSS),
        method=METHODS,
        n=BUDGETS,
        seed=SEEDS,
    )
    if config["full"]["enabled"]:
        out += expand(
            "results/{dataset}/eval/{model}/full/seed{seed}.parquet",
            dataset=DATASET,
            model=MODEL,
            seed=SEEDS,
        )
    return out


def included_eval_files():
    """tables.include: evaluation tables of earlier runs with other configs (other encoder
    pairs, LoRA), read as they are; they are not rebuilt by this run."""
    try:
        return included_tables(config["tables"]["include"], eval_files())
    except VlddError as err:
        raise WorkflowError(str(err)) from None


def cross_model(arch):
    """The model config of a cross-architecture evaluation: another image encoder, the same
    text side (the distilled texts live in its embedding space)."""
    if arch not in CROSS:
        raise WorkflowError(
            f"no evaluate.cross_architectures entry '{arch}': known are " f"{sorted(CROSS)}."
        )
    return {**config["model"], "name": f"{MODEL}@{arch}", "image_encoder": CROSS[arch]}


def figure_files():
    out = expand(
        "results/figures/{dataset}/{model}/{method}/n{n}/{name}.png",
        dataset=DATASET,
        model=MODEL,
        method=METHODS,
        n=BUDGETS,
        name=["examples", "curve"],
    )
    return out + ["results/figures/recall_vs_budget.png"]


def get_final_output():
    return [
        "results/tables/retrieval.md",
        "results/tables/retrieval.parquet",
        "results/tables/ablations.md",
        *figure_files(),
    ]
