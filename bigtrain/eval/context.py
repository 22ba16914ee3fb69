"""Where an evaluator runs (its share of the data-parallel group, device, autocast): what the
trainer hands a family's evaluator. Below the evaluators and the family registry alike."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bigtrain.metrics import Progress


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
    rank: int = 0  # the global rank: only rank 0 shows progress
    progress_mode: str = "off"  # log.progress
    progress_every_s: float = 30.0  # log.progress_every_s

    def progress(self, total: int, what: str, unit: str) -> "Progress":
        """Progress of a long part of an evaluation (batches, denoising steps), shown as training's is."""
        from bigtrain.metrics import Progress

        return Progress(total, 0, self.progress_mode, self.rank == 0, desc=f"eval @ step {self.step()}: {what}",
                        unit=unit, interval_s=self.progress_every_s)
