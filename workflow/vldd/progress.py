"""Progress lines that a person reads in a log file (no carriage returns, no bars).

    p = Progress(150, "distill n50", unit="iteration", log=log)
    for ...:
        p.update(1, loss=1.42)

logs, through `log` (the CLI's logging format puts the time stamp in front), lines like

    distill n50: iteration 30/150 (20%), 1.9 it/s, elapsed 16s, ETA 1m03s, loss 1.42

The first unit and the last are always reported; in between a line is written when at least
`every` units and `min_interval` seconds have passed since the previous one, and never more
often than every 1/50 of the time run so far, so a run of hours leaves a few hundred lines.
The rate counts only the units done by this process (a resumed run starts at `start`).

Importing this module turns off the progress bars of the Hugging Face libraries (tqdm bars
redrawn with carriage returns, e.g. transformers' "Loading weights"), unless the environment
sets HF_HUB_DISABLE_PROGRESS_BARS itself.
"""
from __future__ import annotations

import logging
import os
import sys
import time

SHORT = {"iteration": "it"}


def quiet_library_bars():
    """No tqdm bars from huggingface_hub / transformers, also when they are already imported."""
    if os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1") != "1":
        return
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    elif "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars
        disable_progress_bars()


quiet_library_bars()


def duration(seconds: float) -> str:
    """'45s', '3m07s', '2h05m', '3d04h'."""
    s = int(round(max(0.0, seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _number(x: float) -> str:
    return f"{x:.3g}" if x < 1000 else f"{x:.0f}"


def rate_text(per_second: float, unit: str) -> str:
    """'1.9 it/s' when at least one unit a second, else '12.3 s/epoch'."""
    unit = SHORT.get(unit, unit)
    if per_second <= 0:
        return f"? {unit}/s"
    if per_second >= 1:
        return f"{_number(per_second)} {unit}/s"
    return f"{_number(1 / per_second)} s/{unit}"


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


class Progress:
    def __init__(self, total: int, what: str, *, unit: str = "iteration", start: int = 0,
                 every: int = 1, min_interval: float = 10.0, log: logging.Logger | None = None,
                 clock=time.monotonic):
        self.total, self.what, self.unit = int(total), what, unit
        self.done = self.start = int(start)
        self.every, self.min_interval = max(1, int(every)), float(min_interval)
        self.log = log or logging.getLogger("vldd.progress")
        self.clock = clock
        self.t0 = self.last_time = clock()
        self.last_done = None  # units done at the last line (None: no line yet)

    def line(self, now: float, values: dict | None = None) -> str:
        elapsed = now - self.t0
        new = self.done - self.start
        rate = new / elapsed if elapsed > 0 and new > 0 else 0.0
        left = max(0, self.total - self.done)
        eta = duration(left / rate) if rate > 0 else ("0s" if not left else "?")
        pct = 100 * self.done // self.total if self.total > 0 else 100
        text = (f"{self.what}: {self.unit} {self.done}/{self.total} ({pct}%), "
                f"{rate_text(rate, self.unit)}, elapsed {duration(elapsed)}, ETA {eta}")
        extra = ", ".join(f"{k} {_value(v)}" for k, v in (values or {}).items())
        return f"{text}, {extra}" if extra else text

    def _due(self, now: float) -> bool:
        if self.last_done is None or self.done >= self.total:
            return True
        if self.done - self.last_done < self.every:
            return False
        return now - self.last_time >= max(self.min_interval, (now - self.t0) / 50)

    def update(self, n: int = 1, **values) -> str | None:
        """Count n more units done; log (and return) a line when one is due."""
        self.done += int(n)
        now = self.clock()
        if not self._due(now):
            return None
        text = self.line(now, values)
        self.log.info(text)
        self.last_time, self.last_done = now, self.done
        return text
