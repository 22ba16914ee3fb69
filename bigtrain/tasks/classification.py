"""Image classification objective (softmax cross-entropy)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class ClassificationTask(nn.Module):
    """Wraps a classifier; ``forward(batch)`` returns the loss and batch metrics.

    The trainer only sees this interface, so every objective (classification,
    diffusion, distillation, LM) runs through the same loop.
    """

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0, loss: str = "softmax") -> None:
        super().__init__()
        if loss not in ("softmax", "sigmoid"):
            raise ValueError(f"classification loss must be 'softmax' or 'sigmoid', got {loss!r}")
        self.model = model
        self.label_smoothing, self.loss_kind = label_smoothing, loss
        self.pipeline_logs: list[dict[str, torch.Tensor]] = []  # per micro-batch, filled on the last stage

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(self.model(batch["image"]), batch)

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weighted mean cross-entropy: samples with weight 0 (substitutes for bad data) count for nothing."""
        labels = batch["label"]
        weight = batch.get("weight")
        if weight is None:
            weight = torch.ones(labels.shape[0], device=logits.device)
        if self.loss_kind == "sigmoid":
            # big_vision's sigmoid_xent: independent binary cross-entropies against the one-hot
            # labels, summed over classes (multi-label style; "Scaling Vision Transformers")
            targets = F.one_hot(labels, logits.shape[-1]).float()
            per_sample = F.binary_cross_entropy_with_logits(logits.float(), targets, reduction="none").sum(-1)
        else:
            per_sample = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, reduction="none")
        denom = weight.sum().clamp_min(1.0)
        loss = (per_sample * weight).sum() / denom
        with torch.no_grad():
            top1 = ((logits.argmax(dim=-1) == labels).float() * weight).sum() / denom
        return {"loss": loss, "top1": top1}

    # --- pipeline parallel: the last stage computes the loss from (output, target) -------
    pipeline_log_keys = ("loss", "top1")  # what pipeline_loss records, known on every stage

    def pipeline_inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        return batch["image"]

    def pipeline_target(self, batch: dict[str, Any]) -> torch.Tensor:
        """Everything the loss needs besides the output, as one tensor the schedule can split."""
        return torch.stack([batch["label"].float(), batch.get("weight", torch.ones(batch["label"].shape[0]))], dim=-1)

    def pipeline_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        out = self.loss(logits, {"label": target[:, 0].long(), "weight": target[:, 1]})
        if logits.device.type != "meta":
            self.pipeline_logs.append({k: v.detach() for k, v in out.items()})  # read once per step
        return out["loss"]
