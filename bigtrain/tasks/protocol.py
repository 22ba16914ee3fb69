"""What the trainer needs from an objective (a ``Task``), written down.

A task owns the model and turns a batch into ``{"loss": scalar tensor, **logs}``; the trainer
averages every returned value over micro-batches and data-parallel ranks, backpropagates
``loss`` and logs the rest. A batch is a dict: tensors of the same leading (sample) dimension
— inputs, and targets that may be several tensors (teacher logits, noise and timesteps,
conditioning) — plus ``weight`` (0 for substitutes of bad samples: they must add nothing) and
the loader's counters (``num_samples``, ``num_errors``, ``errors``).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn


def batch_to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch's tensors on ``device`` (non-blocking copies: from pinned memory they overlap compute);
    other entries (the loader's counters) as they are. On the CPU the batch itself."""
    if device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


@runtime_checkable
class Task(Protocol):
    model: nn.Module

    def __call__(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``{"loss": ..., **logs}`` for one micro-batch (weighted by ``batch["weight"]``)."""
        ...


@runtime_checkable
class PipelineTask(Task, Protocol):
    """A task the pipeline schedule can run: inputs enter the first stage, the loss is computed on the
    last stage's output against the target, and each micro-batch's logs are kept for the trainer."""

    pipeline_log_keys: tuple[str, ...]  # the keys pipeline_loss records per micro-batch ("loss" first)
    pipeline_logs: list[dict[str, torch.Tensor]]  # detached 0-dim tensors: read by the trainer once per step

    def pipeline_inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the first stage receives (one tensor: the schedule splits it into micro-batches)."""
        ...

    def pipeline_target(self, batch: dict[str, Any]) -> torch.Tensor:
        """What the loss on the last stage receives besides the output (one tensor, split alike;
        several targets are packed into one tensor and unpacked by ``pipeline_loss``)."""
        ...

    def pipeline_loss(self, output: Any, target: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss; also appends that micro-batch's logs to ``pipeline_logs``."""
        ...
