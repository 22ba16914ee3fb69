"""Run output: rank-0 logging, metrics.jsonl, optional wandb, progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("bigtrain")


def setup_logging(rank: int) -> None:
    """Only rank 0 prints INFO; other ranks print warnings and errors (prefixed with the rank)."""
    level = logging.INFO if rank == 0 else logging.WARNING
    prefix = "" if rank == 0 else f"[rank{rank}] "
    logging.basicConfig(level=level, format=f"{prefix}%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


def _clean(value: Any) -> Any:
    """JSON-safe scalars (tensors -> floats, NaN/inf -> strings JSON can hold)."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Appends one JSON object per record to ``run_dir/metrics.jsonl`` (rank 0 only).

    On resume, records after the resumed step are dropped first, so the file
    reads like one uninterrupted run.
    """

    def __init__(self, run_dir: str, enabled: bool, resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self._wandb: Any = None
        if not enabled:
            self._f = None
            return
        os.makedirs(run_dir, exist_ok=True)
        kept: list[str] = []
        if resume_step is not None and os.path.isfile(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line).get("step", 0) <= resume_step:
                            kept.append(line if line.endswith("\n") else line + "\n")
                    except json.JSONDecodeError:  # a line cut by a crash
                        continue
        self._f = open(self.path, "w")
        self._f.writelines(kept)
        self._f.flush()

    def enable_wandb(self, project: str, name: str, config: dict[str, Any], run_dir: str) -> None:
        if not self.enabled:
            return
        try:
            import wandb
        except ImportError:
            raise RuntimeError("log.wandb=true needs the wandb package: pip install 'bigtrain[wandb]'") from None
        self._wandb = wandb.init(project=project, name=name, config=config, dir=run_dir, resume="allow")

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or self._f is None:
            return
        clean = {k: _clean(v) for k, v in record.items()}
        self._f.write(json.dumps(clean) + "\n")
        self._f.flush()
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in clean.items() if isinstance(v, (int, float))}, step=clean.get("step"))

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Progress of a long loop (training steps, evaluation batches, sampling steps), on rank 0.

    ``mode``: ``auto`` draws a tqdm bar on a terminal and, where stderr is not one (a Slurm log, a
    pipe, ``nohup``), logs one line every ``interval_s`` seconds instead of staying silent: position,
    the caller's postfix (loss, throughput), rate, elapsed time and ETA. ``on`` always draws the bar,
    ``lines`` always logs lines, ``off`` shows nothing. The first update and the last always log a
    line, so a short loop still says it ran."""

    def __init__(self, total: int, initial: int = 0, mode: str = "auto", enabled: bool = True, *, desc: str = "train",
                 unit: str = "step", interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.bar: Any = None
        terminal = sys.stderr.isatty()
        self.lines = enabled and (mode == "lines" or (mode == "auto" and not terminal))
        self.total, self.position, self.desc, self.unit = total, initial, desc, unit
        self.interval_s, self.clock = interval_s, clock
        self._start = clock()
        self._done = 0  # updates since the start (a rollback moves the position back, not this)
        self._last_line: float | None = None
        if enabled and (mode == "on" or (mode == "auto" and terminal)):
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True, file=sys.stderr)

    def update(self, postfix: dict[str, Any] | None = None, n: int = 1) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in (postfix or {}).items()}
        self.position += n
        self._done += n
        if self.bar is not None:
            self.bar.set_postfix(shown, refresh=False)
            self.bar.update(n)
        if not self.lines:
            return
        now = self.clock()
        if self._last_line is None or now - self._last_line >= self.interval_s or self.position >= self.total:
            self._last_line = now
            log.info("%s", self.line(now, shown))

    def line(self, now: float, shown: dict[str, Any]) -> str:
        """``train: step 120/1000 (12%) loss=2.314 | 3.1 step/s | elapsed 0:00:38 | ETA 0:04:44``."""
        elapsed = now - self._start
        rate = self._done / elapsed if elapsed > 0 else 0.0
        eta = _clock((self.total - self.position) / rate) if rate > 0 else "?"
        pct = 100 * self.position / self.total if self.total else 100.0
        extra = "".join(f" {k}={v}" for k, v in shown.items())
        return (f"{self.desc}: {self.unit} {self.position}/{self.total} ({pct:.0f}%){extra} | {rate:.3g} {self.unit}/s"
                f" | elapsed {_clock(elapsed)} | ETA {eta}")

    def reset(self, position: int) -> None:
        """Jump back (after a rollback) without restarting the throughput clock."""
        self.position = position
        if self.bar is not None:
            self.bar.n = position
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
