"""Where an evaluator runs (its share of the data-parallel group, device, autocast): what the
trainer hands a family's evaluator. Below the evaluators and the family registry alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class EvalContext:
    """Where an evaluator runs: its data-parallel share and device, and the autocast to use."""

    dp_rank: int
    dp_size: int
    dp_group: Any
    device: Any
    autocast: Callable[[], Any]
    num_workers: int = 0
    run_dir: str = ""  # where an evaluator may write pictures (e.g. sample grids); '' = nowhere
    step: Callable[[], int] = lambda: 0  # the training step being evaluated
