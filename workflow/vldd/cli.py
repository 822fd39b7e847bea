"""The `vldd` command: one subcommand per stage (the rule of the same name calls it).

Stage settings come as JSON (`--config-json`, the config sections the stage reads, exactly
as the Snakemake rule passes them in params), so a stage runs the same with or without
Snakemake. Exit status: 0 done, 2 bad input (one message naming the file or key and the fix).
"""
from __future__ import annotations

import _thread
import argparse
import errno
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from .config import STAGE_SECTIONS, stage_config
from .errors import VlddError


def _json(text: str) -> dict:
    if text.startswith("@"):
        try:
            text = Path(text[1:]).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise VlddError(f"--config-json {text}: cannot read the file ({exc}).") from exc
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        why = "nested too deeply" if isinstance(exc, RecursionError) else exc
        raise VlddError(f"--config-json is not valid JSON ({why}).") from exc
    if not isinstance(value, dict):
        raise VlddError("--config-json must be a JSON object.")
    from .checks import validate_sections
    validate_sections(value)
    return value


OUTPUTS = ("out_dir", "out", "curve", "out_parquet", "out_md", "out_ablations", "out_examples",
           "out_curve", "out_recall")


def _check_outputs(args):
    """Every output folder must be writable before the stage starts (not after hours)."""
    from .checks import check_writable
    for name in OUTPUTS:
        path = getattr(args, name, None)
        if path is not None:
            check_writable(path, "--" + name.replace("_", "-"))


# OSErrors that are the machine's state, not a bug: one line that says which and the fix.
_OS_FIX = {errno.ENOSPC: "free space on that disk (or point results elsewhere) and rerun",
           errno.EDQUOT: "free space within your quota and rerun",
           errno.EFBIG: "the file is larger than this file system or ulimit -f allows",
           errno.EROFS: "the file system is read-only: write the results elsewhere",
           errno.EACCES: "fix the permissions, or write the results elsewhere",
           errno.EPERM: "fix the permissions, or write the results elsewhere"}


def _os_error(exc: OSError):
    code = exc.errno
    if code is None:  # h5py puts the C errno into the message only
        for c in _OS_FIX:
            if f"errno = {c}," in str(exc):
                code = c
    if code not in _OS_FIX:
        return None
    said = " ".join(str(exc).split())[:240]   # h5py's message spans lines
    return VlddError(f"{exc.filename or 'writing an output'}: {errno.errorcode[code]} "
                     f"({said}): {_OS_FIX[code]}. Nothing half-written was kept.")


def _terminate(signum, frame):
    """SIGTERM (Snakemake or Slurm stopping a job) runs the cleanup of partial outputs."""
    raise KeyboardInterrupt(f"signal {signum}")


def _unraisable(u):
    """Exceptions Python cannot raise (in a finaliser: __del__, a weakref callback, e.g. of
    h5py or torch objects freed mid-iteration) are logged at debug level. A stop signal that
    landed in one would be lost there and the job would run on: deliver it again."""
    if isinstance(u.exc_value, KeyboardInterrupt):
        # from another thread, so that it is raised once the finaliser has returned (raised
        # here, it would be swallowed again; if it is, this hook runs again)
        threading.Timer(0.01, _thread.interrupt_main, (signal.SIGTERM,)).start()
        return
    logging.getLogger("vldd").debug("ignored in %r: %s", u.object, u.exc_value)


def cmd_prepare_dataset(a, cfg):
    from .stages.prepare_dataset import prepare_dataset
    prepare_dataset(cfg["dataset"], a.out_dir)


def cmd_embed_captions(a, cfg):
    from .stages.embed_captions import embed_captions
    embed_captions(a.data, cfg["model"].text_encoder, a.out, device=a.device)


def cmd_train_expert(a, cfg):
    from .stages.train_expert import train_expert
    train_expert(a.data, a.embeddings, cfg["model"], cfg["experts"], a.index, a.out,
                 device=a.device)


def cmd_shortcut_expert(a, cfg):
    from .stages.shortcut_expert import shortcut_expert
    shortcut_expert(a.expert, a.window, a.out)


def cmd_distill(a, cfg):
    from .stages.distill import distill
    distill(a.data, a.embeddings, a.experts, cfg["model"], cfg["distill"], a.budget, a.out,
            a.curve, device=a.device)


def cmd_select_coreset(a, cfg):
    from .stages.select_coreset import select_coreset
    select_coreset(a.data, a.embeddings, cfg["model"], a.kind, a.budget, cfg["coresets"].seed,
                   a.out, expert_path=a.experts, experts_cfg=cfg["experts"], device=a.device)


def cmd_evaluate(a, cfg):
    from .stages.evaluate import evaluate
    evaluate(a.data, a.embeddings, a.pairs, cfg["model"], cfg["evaluate"], a.seed, a.out,
             dataset=a.dataset, device=a.device)


def cmd_train_full(a, cfg):
    from .stages.evaluate import train_full
    train_full(a.data, a.embeddings, cfg["model"], cfg["full"], a.seed, a.out,
               dataset=a.dataset, device=a.device)


def cmd_summarize(a, cfg):
    from .checks import check_eval_table
    from .stages.summarize import summarize
    for path in a.inputs:
        check_eval_table(path)
    summarize(a.inputs, a.out_parquet, a.out_md, a.out_ablations, a.main_method)


def cmd_figures(a, cfg):
    from .stages import figures
    did = False
    if a.pairs and a.out_examples:
        figures.examples_figure(a.pairs, a.data, a.embeddings, a.out_examples)
        did = True
    if a.curve and a.out_curve:
        figures.curve_figure(a.curve, a.out_curve)
        did = True
    if a.table and a.out_recall:
        figures.recall_figure(a.table, a.out_recall)
        did = True
    if not did:
        raise VlddError("figures: nothing to draw; give --pairs/--out-examples (with --data and "
                        "--embeddings), --curve/--out-curve or --table/--out-recall.")


def cmd_inspect(a, cfg):
    from .stages.inspect import describe
    for path in a.files:
        print(describe(path))


def _stage(sub, name, fn, help_, inputs=("data", "embeddings")):
    """A stage's subcommand with the options every stage has."""
    s = sub.add_parser(name, help=help_)
    s.set_defaults(fn=fn)
    s.add_argument("--config-json", default="{}",
                   help="the config sections of this stage as JSON (or @file.json)")
    s.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    for name_ in inputs:
        s.add_argument(f"--{name_}", required=True, type=Path)
    return s


def _compute_stages(sub):
    s = _stage(sub, "prepare-dataset", cmd_prepare_dataset,
               "images.h5 + captions.parquet from a source", inputs=())
    s.add_argument("--out-dir", required=True, type=Path)
    s = _stage(sub, "embed-captions", cmd_embed_captions, "frozen text encoder over every caption",
               inputs=("data",))
    s.add_argument("--out", required=True, type=Path)
    s = _stage(sub, "train-expert", cmd_train_expert, "train one expert and record its trajectory")
    s.add_argument("--index", required=True, type=int)
    s.add_argument("--out", required=True, type=Path)
    s = _stage(sub, "shortcut-expert", cmd_shortcut_expert,
               "an expert trajectory straightened over a window of epochs (PTM-ST)", inputs=())
    s.add_argument("--expert", required=True, type=Path)
    s.add_argument("--window", required=True, type=int, nargs=2, metavar=("A", "B"))
    s.add_argument("--out", required=True, type=Path)
    s = _stage(sub, "distill", cmd_distill, "bi-trajectory matching into a pair set")
    s.add_argument("--experts", type=Path, nargs="*", default=[],
                   help="expert trajectories (none for distill.method covmatch)")
    s.add_argument("--budget", required=True, type=int)
    s.add_argument("--out", required=True, type=Path)
    s.add_argument("--curve", required=True, type=Path)
    s = _stage(sub, "select-coreset", cmd_select_coreset, "N real pairs chosen by a rule")
    s.add_argument("--kind", required=True)
    s.add_argument("--experts", type=Path, default=None,
                   help="expert trajectory whose final parameters embed the pairs "
                        "(herding, kcenter)")
    s.add_argument("--budget", required=True, type=int)
    s.add_argument("--out", required=True, type=Path)
    for name, fn, help_ in (("evaluate", cmd_evaluate,
                             "train a fresh model on a pair set, test retrieval"),
                            ("train-full", cmd_train_full, "the full-data upper bound")):
        s = _stage(sub, name, fn, help_)
        if name == "evaluate":
            s.add_argument("--pairs", required=True, type=Path)
        s.add_argument("--seed", required=True, type=int)
        s.add_argument("--dataset", default="")
        s.add_argument("--out", required=True, type=Path)


def _report_stages(sub):
    s = _stage(sub, "summarize", cmd_summarize, "retrieval tables from evaluation Parquet files",
               inputs=())
    s.add_argument("--inputs", required=True, type=Path, nargs="+")
    s.add_argument("--out-parquet", required=True, type=Path)
    s.add_argument("--out-md", required=True, type=Path)
    s.add_argument("--out-ablations", type=Path, default=None,
                   help="also write the ablation tables (encoders and LoRA, variants, "
                        "cross-architecture) as Markdown")
    s.add_argument("--main-method", default="mtt", help="distill.method of the main run")
    s = _stage(sub, "figures", cmd_figures, "the paper's figures from distilled sets and tables",
               inputs=())
    for name_ in ("data", "embeddings", "pairs", "curve", "table", "out-examples", "out-curve",
                  "out-recall"):
        s.add_argument(f"--{name_}", type=Path, default=None)
    s = sub.add_parser("inspect", help="provenance and shapes of vldd HDF5 / Parquet files")
    s.set_defaults(fn=cmd_inspect, config_json="{}")
    s.add_argument("files", nargs="+", type=Path)


def build_parser():
    p = argparse.ArgumentParser(prog="vldd", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    _compute_stages(sub)
    _report_stages(sub)
    return p


def _quiet_h5_dealloc(default):
    """h5py's Cython deallocators print their failures through sys.excepthook (a traceback
    per object of a file whose write failed, e.g. on a full disk): log those at debug level;
    everything else goes to the default hook."""
    def hook(kind, value, tb):
        if isinstance(value, RuntimeError) and "decrement id ref count" in str(value):
            logging.getLogger("vldd").debug("h5py dealloc: %s", value)
            return
        default(kind, value, tb)
    return hook


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    signal.signal(signal.SIGTERM, _terminate)
    # h5py reports failed closes of a file it could not write (a full disk) from __del__ as
    # "Exception ignored" tracebacks; the failure itself is reported once, below.
    sys.unraisablehook = _unraisable
    sys.excepthook = _quiet_h5_dealloc(sys.excepthook)
    try:
        cfg = _json(args.config_json)
        if args.command in STAGE_SECTIONS:   # typed sections, defaults from the schema
            cfg = stage_config(args.command, cfg)
        _check_outputs(args)
        if args.threads:
            import torch
            torch.set_num_threads(args.threads)
        args.fn(args, cfg)
    except OSError as exc:
        err = _os_error(exc)
        if err is None:
            raise
        print(f"vldd {args.command}: error: {err}", file=sys.stderr)
        # h5py objects of a file whose write failed can crash the interpreter's teardown
        # (a segfault after the error was printed): leave without it; outputs are cleaned.
        sys.stderr.flush()
        os._exit(2)
    except VlddError as exc:
        print(f"vldd {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vldd {args.command}: interrupted; partial outputs removed.", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
