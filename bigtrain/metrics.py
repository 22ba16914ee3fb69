"""Run output: rank-0 logging, metrics.jsonl, optional wandb, progress bar."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
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


class Progress:
    """tqdm bar with throughput and ETA, only on rank 0 and (in auto mode) only on a terminal."""

    def __init__(self, total: int, initial: int, mode: str, enabled: bool) -> None:
        show = enabled and (mode == "on" or (mode == "auto" and sys.stderr.isatty()))
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, postfix: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}, refresh=False)
            self.bar.update(1)

    def reset(self, position: int) -> None:
        """Jump back (after a rollback) without restarting the throughput clock."""
        if self.bar is not None:
            self.bar.n = position
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
