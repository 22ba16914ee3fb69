"""Next-token prediction objective for decoder-only LMs."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CausalLMTask(nn.Module):
    """``batch["tokens"]`` holds seq_len + 1 tokens: inputs ``[:-1]``, targets ``[1:]``.

    Loss = mean next-token cross-entropy over the tokens of samples with weight 1
    (weight-0 rows substitute bad samples and count for nothing).
    """

    pipeline_log_keys = ("loss", "token_acc")

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.pipeline_logs: list[dict[str, torch.Tensor]] = []

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.loss(self.model(self.pipeline_inputs(batch)), batch)

    def loss(self, logits: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        labels = batch["tokens"][:, 1:]
        weight = batch.get("weight")
        if weight is None:
            weight = torch.ones(labels.shape[0], device=logits.device)
        per_token = F.cross_entropy(logits.float().flatten(0, 1), labels.reshape(-1), reduction="none").view_as(labels)
        w = weight[:, None].expand_as(labels)
        denom = w.sum().clamp_min(1.0)
        loss = (per_token * w).sum() / denom
        with torch.no_grad():
            acc = ((logits.argmax(-1) == labels).float() * w).sum() / denom
        return {"loss": loss, "token_acc": acc}

    # --- pipeline parallel ---------------------------------------------------------------
    def pipeline_inputs(self, batch: dict[str, Any]) -> torch.Tensor:
        # contiguous: the schedules of torch 2.11 check the strides of what stage 0 receives against
        # the shapes they planned with ((T, 1)); a [:, :-1] view has (T + 1, 1) and fails at step 1
        return batch["tokens"][:, :-1].contiguous()

    def pipeline_target(self, batch: dict[str, Any]) -> torch.Tensor:
        """Targets and the per-sample weight packed into one float tensor (token ids < 2**24 are exact)."""
        tokens = batch["tokens"]
        weight = batch.get("weight", torch.ones(tokens.shape[0]))
        return torch.cat([tokens[:, 1:].float(), weight[:, None]], dim=1)

    def pipeline_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        batch = {"tokens": torch.cat([target[:, :1], target[:, :-1]], dim=1).long(), "weight": target[:, -1]}
        out = self.loss(logits, batch)
        if logits.device.type != "meta":
            self.pipeline_logs.append({k: v.detach() for k, v in out.items()})  # read once per step
        return out["loss"]
