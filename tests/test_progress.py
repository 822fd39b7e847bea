"""Progress lines a person reads: the helper with an injected clock, stages through the CLI,
and the log files of the tiny workflow run (time stamps, rate and ETA, no carriage returns)."""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys

import pytest

from conftest import DATASET, DISTILL, MODEL
from vldd.progress import Progress, duration, rate_text

# "2026-11-30 22:41:07,123 INFO vldd.stages.distill: distill mtt n8: iteration 2/4 (50%), 1.9 it/s,
#  elapsed 1s, ETA 1s, matching_loss 1.42, ..."
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\S* INFO \S+: .+: \w+ \d+/\d+ \(\d+%\), "
                  r"[\d.?]+ \S+, elapsed \w+, ETA [\w?]+", re.M)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_durations_and_rates_read_as_a_person_writes_them():
    assert [duration(s) for s in (0, 44.6, 63, 3599, 7500, 200000)] == \
        ["0s", "45s", "1m03s", "59m59s", "2h05m", "2d07h"]
    assert rate_text(1.93, "iteration") == "1.93 it/s"
    assert rate_text(0.25, "epoch") == "4 s/epoch"
    assert rate_text(24900.4, "image") == "24900 image/s"
    assert rate_text(1 / 3600, "epoch") == "3600 s/epoch"
    assert rate_text(0.0, "epoch") == "? epoch/s"


def test_lines_give_count_rate_elapsed_eta_and_values(caplog):
    clock = Clock()
    p = Progress(150, "distill n50", clock=clock, log=logging.getLogger("t"))
    with caplog.at_level(logging.INFO, logger="t"):
        clock.now += 2.0
        first = p.update(1, loss=1.4213, lr_image=0.01)
        for _ in range(29):
            clock.now += 0.5
            p.update(1, loss=1.42)
    assert first == ("distill n50: iteration 1/150 (0%), 2 s/it, elapsed 2s, ETA 4m58s, "
                     "loss 1.421, lr_image 0.01")
    # iterations 2..30 take 14.5 s: one line 10 s after the first (at iteration 21)
    assert [r.getMessage() for r in caplog.records] == [
        first, "distill n50: iteration 21/150 (14%), 1.75 it/s, elapsed 12s, ETA 1m14s, loss 1.42"]


def test_the_last_unit_is_always_reported_and_a_resumed_run_counts_only_its_own_units():
    clock = Clock()
    p = Progress(10, "train_expert 0", unit="epoch", start=8, clock=clock)
    clock.now += 30
    assert p.update(1, loss=2.0) == ("train_expert 0: epoch 9/10 (90%), 30 s/epoch, "
                                     "elapsed 30s, ETA 30s, loss 2")
    clock.now += 1
    assert p.update(1).startswith("train_expert 0: epoch 10/10 (100%), 15.5 s/epoch, "
                                  "elapsed 31s, ETA 0s")


def test_long_runs_write_fewer_lines_as_they_go():
    """At most one line per min_interval, and per 1/50 of the time run so far."""
    clock = Clock()
    p = Progress(100000, "x", min_interval=10, clock=clock)
    lines = 0
    for _ in range(100000):
        clock.now += 1.0  # a 28-hour run, one unit a second
        lines += p.update(1) is not None
    assert 150 < lines < 600


def vldd(*args, config):
    cmd = [sys.executable, "-m", "vldd", "--threads", "1", args[0], "--config-json",
           json.dumps(config), "--device", "cpu", *map(str, args[1:])]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def assert_readable(out, *stages):
    assert out.returncode == 0, out.stderr[-3000:]
    assert "\r" not in out.stderr and "\r" not in out.stdout
    lines = LINE.findall(out.stderr)
    for stage in stages:
        assert any(f": {stage}" in ln for ln in lines), out.stderr[-3000:]
    return lines


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    out = vldd("prepare-dataset", "--out-dir", root / "data", config={"dataset": DATASET})
    lines = assert_readable(out, "prepare_dataset t: image")
    assert lines[-1].split(": image ")[1].startswith("40/40 (100%)"), lines
    return root


def test_embed_captions_logs_progress_and_no_bars(prepared):
    """transformers' 'Loading weights' bar used to put carriage returns in this log."""
    out = vldd("embed-captions", "--data", prepared / "data", "--out", prepared / "emb.h5",
               config={"model": MODEL})
    assert_readable(out, "embed_captions all-MiniLM-L6-v2: caption")


def test_distill_logs_iterations_with_loss_and_lrs(store, tmp_path):
    out = vldd("distill", "--data", store / "data", "--embeddings", store / "emb.h5",
               "--experts", store / "expert_0.h5", "--budget", 6, "--out", tmp_path / "p.h5",
               "--curve", tmp_path / "c.parquet", config={"model": MODEL, "distill": DISTILL})
    lines = assert_readable(out, "distill mtt n6: iteration")
    assert "iteration 4/4 (100%)" in lines[-1]
    assert re.search(r"iteration 4/4 \(100%\), .*, matching_loss [\d.e+-]+, "
                     r"lr_image [\d.e+-]+, lr_text [\d.e+-]+$", out.stderr, re.M), out.stderr


PROGRESS_LOGS = {"experts": "train_expert", "distilled": "distill", "eval": "evaluate|train_full",
                 "embed_captions": "embed_captions", "prepare_dataset": "prepare_dataset"}


def test_the_workflows_logs_are_readable(tiny_run):
    """Every log of the tiny run is free of carriage returns, and every long stage's log has
    time-stamped progress lines with rate and ETA."""
    logs = sorted((tiny_run / "results" / "logs").rglob("*.log"))
    assert logs
    for path in logs:
        raw = path.read_bytes()
        assert b"\r" not in raw, path
        rel = path.relative_to(tiny_run / "results" / "logs").as_posix()
        for part, stage in PROGRESS_LOGS.items():
            if part in rel.split("/") or rel.split("/")[-1].startswith(part):
                lines = LINE.findall(raw.decode())
                assert any(re.search(rf": ({stage})\b", ln) for ln in lines), (rel, raw[-2000:])
