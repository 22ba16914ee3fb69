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
        logits = self.model(batch["image"])
        labels = batch["label"]
        loss = F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            top1 = (logits.argmax(dim=-1) == labels).float().mean()
        return {"loss": loss, "top1": top1}
