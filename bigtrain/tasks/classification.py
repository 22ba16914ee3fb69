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

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.model = model
        self.label_smoothing = label_smoothing

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(self.model(batch["image"]), batch)

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Weighted mean cross-entropy: samples with weight 0 (substitutes for bad data) count for nothing."""
        labels = batch["label"]
        weight = batch.get("weight")
        if weight is None:
            weight = torch.ones(labels.shape[0], device=logits.device)
        per_sample = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing, reduction="none")
        denom = weight.sum().clamp_min(1.0)
        loss = (per_sample * weight).sum() / denom
        with torch.no_grad():
            top1 = ((logits.argmax(dim=-1) == labels).float() * weight).sum() / denom
        return {"loss": loss, "top1": top1}
