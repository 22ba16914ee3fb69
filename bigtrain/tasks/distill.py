"""Knowledge distillation objectives: a student trained towards a frozen teacher's outputs.

The KD term is the forward KL(teacher || student) of the two softmaxes at temperature tau,
scaled by tau^2 (Hinton et al.: the gradients then keep their size as tau changes), **summed over
the vocabulary and averaged over tokens**. Model-Optimizer's ``reduction="mean"`` averages over
tokens x vocabulary instead, which divides the loss (and its gradient) by the vocabulary size.
An optional cross-entropy on the data's own next tokens and an optional hidden-state loss (block
outputs of a depth-pruned student against the teacher's matching blocks) mix in with weights.

The teacher's target may come from the live teacher (logits) or from stored sparse top-k logits
(a dense distribution rebuilt from the top k plus the remaining mass spread uniformly); both
reach :func:`kd_per_item` as probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.tasks.causal_lm import CausalLMTask
from bigtrain.tasks.classification import ClassificationTask


def kd_per_item(student_logits: torch.Tensor, target_probs: torch.Tensor, tau: float) -> torch.Tensor:
    """``tau^2 * KL(q || softmax(student / tau))`` over the last dimension, one value per item (token or
    sample). ``q`` is the teacher's distribution at the same temperature; entries with q = 0 add 0."""
    log_p = F.log_softmax(_upcast(student_logits) / tau, dim=-1)
    q = _upcast(target_probs)
    return tau * tau * (torch.special.xlogy(q, q) - q * log_p).sum(-1)


def teacher_probs(teacher_logits: torch.Tensor, tau: float) -> torch.Tensor:
    return F.softmax(_upcast(teacher_logits) / tau, dim=-1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16 logits lose the small probabilities KD is about); fp64 stays fp64."""
    return x if x.dtype == torch.float64 else x.float()


def default_layer_map(student_depth: int, teacher_depth: int) -> list[int]:
    """Student block j matches teacher block round((j + 1) * T / S) - 1: evenly spaced, last to last."""
    return [max(0, round((j + 1) * teacher_depth / student_depth) - 1) for j in range(student_depth)]


class _BlockOutputs:
    """Records the outputs of chosen blocks during forwards run inside :meth:`recording` (hooks stay
    registered; outside it they do nothing, e.g. in evaluation or an activation-checkpoint recompute)."""

    def __init__(self, blocks: nn.ModuleDict, names: list[str]) -> None:
        self.outputs: dict[str, torch.Tensor] = {}
        self.active = False
        for name in names:
            blocks[name].register_forward_hook(self._hook(name))

    def _hook(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.active:
                self.outputs[name] = output[0] if isinstance(output, tuple) else output
        return hook

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[str, torch.Tensor]]:
        self.outputs.clear()
        self.active = True
        try:
            yield self.outputs
        finally:
            self.active = False


def sparse_target(val: torch.Tensor, idx: torch.Tensor, lse: torch.Tensor, vocab: int, tau: float) -> torch.Tensor:
    """The dense teacher distribution at temperature ``tau`` from stored top-k logits ``val`` (classes
    ``idx``) and the full logsumexp of logits / tau: exact on the top k, the remaining mass spread
    evenly over the other classes (TinyViT)."""
    top = torch.exp(val.float() / tau - lse.float()[..., None])
    k = idx.shape[-1]
    rest = (1.0 - top.sum(-1, keepdim=True)).clamp_min(0.0) / max(vocab - k, 1)
    return rest.expand(*top.shape[:-1], vocab).scatter(-1, idx, top)


class _Distill:
    """What the LM and classification distillation tasks share: the teacher, the target (live teacher
    or stored top-k fields ``t_val``/``t_idx``/``t_lse`` in the batch), the KD + CE mix and the logs.
    The host class provides ``model``, ``loss(logits, batch)`` (the data's cross-entropy) and
    ``pipeline_inputs(batch)`` (what both models read)."""

    uses_teacher = True
    model: nn.Module

    def _distill_init(self, teacher: nn.Module | None, temperature: float, kd_weight: float, ce_weight: float) -> None:
        self.teacher = [teacher]  # a list: not a submodule, so never in the model's state dict or optimizer
        self.tau, self.kd_weight, self.ce_weight = temperature, kd_weight, ce_weight

    @torch.no_grad()
    def teacher_logits(self, batch: dict[str, Any]) -> torch.Tensor:
        """The teacher's logits, (batch, items, classes): what a logit store keeps the top k of."""
        if self.teacher[0] is None:
            raise RuntimeError("this task has no teacher (it reads stored targets)")
        t = self.teacher[0](self.pipeline_inputs(batch))
        return t.view(t.shape[0], -1, t.shape[-1])

    def _targets(self, batch: dict[str, Any], logits: torch.Tensor,
                 t_logits: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(teacher distribution at tau, teacher top-1), shaped like ``logits`` without / with classes."""
        if t_logits is not None:
            return teacher_probs(t_logits, self.tau), t_logits.argmax(-1)
        shape = logits.shape[:-1]
        val, idx = batch["t_val"].reshape(*shape, -1), batch["t_idx"].reshape(*shape, -1)
        return sparse_target(val, idx, batch["t_lse"].reshape(shape), logits.shape[-1], self.tau), idx[..., 0]

    def distill_loss(self, logits: torch.Tensor, batch: dict[str, Any],
                     t_logits: torch.Tensor | None) -> dict[str, torch.Tensor]:
        target, t_top1 = self._targets(batch, logits, t_logits)
        ce = self.loss(logits, batch)  # {"loss": the data's cross-entropy, accuracy}
        kd = weighted_mean(kd_per_item(logits, target, self.tau), batch)
        loss = self.kd_weight * kd + (self.ce_weight * ce["loss"] if self.ce_weight else 0.0)
        out = {**{k: v.detach() for k, v in ce.items() if k != "loss"}, "loss": loss, "kd": kd.detach(),
               "ce": ce["loss"].detach()}
        with torch.no_grad():
            out["teacher_agreement"] = weighted_mean((logits.argmax(-1) == t_top1).float(), batch)
        return out


def weighted_mean(per_item: torch.Tensor, batch: dict[str, Any]) -> torch.Tensor:
    """Mean over items (tokens of a sequence, or samples) of the samples with weight 1."""
    weight = batch.get("weight")
    if weight is None:
        return per_item.mean()
    w = weight.to(per_item.device).view(-1, *[1] * (per_item.ndim - 1)).expand_as(per_item)
    return (per_item * w).sum() / w.sum().clamp_min(1.0)


class DistillLMTask(_Distill, CausalLMTask):
    """Next-token distillation of a causal LM: ``batch["tokens"]`` as for :class:`CausalLMTask`; the
    teacher (or the store) gives a target per input token. Logs ``kd``, ``ce`` (always: it is the
    number comparable with training from scratch), ``hidden`` (when weighted), ``token_acc`` and
    ``teacher_agreement`` (the student's top-1 equals the teacher's)."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, temperature: float = 1.0, kd_weight: float = 1.0,
                 ce_weight: float = 0.0, hidden_weight: float = 0.0, hidden_layers: list[int] | None = None) -> None:
        CausalLMTask.__init__(self, model)
        self._distill_init(teacher, temperature, kd_weight, ce_weight)
        self.hidden_weight = hidden_weight
        self.student_blocks = self.teacher_blocks = None
        if hidden_weight > 0:
            if teacher is None:
                raise ValueError("the hidden-state loss needs a live teacher (stored targets hold logits only)")
            s_names, t_names = list(model.blocks.keys()), list(teacher.blocks.keys())
            mapping = hidden_layers or default_layer_map(len(s_names), len(t_names))
            if len(mapping) != len(s_names) or not all(0 <= i < len(t_names) for i in mapping):
                raise ValueError(f"distill.hidden_layers must give one teacher block (0..{len(t_names) - 1}) for each of "
                                 f"the student's {len(s_names)} blocks, got {mapping}")
            self.pairs = [(s, t_names[i]) for s, i in zip(s_names, mapping)]
            self.student_blocks = _BlockOutputs(model.blocks, s_names)
            self.teacher_blocks = _BlockOutputs(teacher.blocks, sorted({t for _, t in self.pairs}, key=int))

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.pipeline_inputs(batch)
        hidden = self.hidden_weight > 0
        t_logits = None
        if "t_val" not in batch:
            with torch.no_grad(), (self.teacher_blocks.recording() if hidden else contextlib.nullcontext()) as t_out:
                t_logits = self.teacher[0](inputs)
        with self.student_blocks.recording() if hidden else contextlib.nullcontext() as s_out:
            logits = self.model(inputs)
        out = self.distill_loss(logits, batch, t_logits)
        if hidden:
            h_loss = self.hidden_loss(s_out, t_out, batch)
            out["loss"] = out["loss"] + self.hidden_weight * h_loss
            out["hidden"] = h_loss.detach()
        return out

    def hidden_loss(self, student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor],
                    batch: dict[str, Any]) -> torch.Tensor:
        """Mean over block pairs and (weighted) tokens of |h_s - h_t|^2 / |h_t|^2. Normalized per token,
        not by the batch's total norm: a ratio of batch sums would change with how the batch is split
        over micro-batches and data-parallel ranks (each averages its own), a per-token mean does not."""
        terms = []
        for s_name, t_name in self.pairs:
            h_s, h_t = student[s_name].float(), teacher[t_name].float()
            if h_s.shape != h_t.shape:
                raise ValueError(f"hidden-state loss: student block {s_name} outputs {tuple(h_s.shape)}, teacher block "
                                 f"{t_name} {tuple(h_t.shape)} (it needs equal widths)")
            per_token = (h_s - h_t).pow(2).sum(-1) / h_t.pow(2).sum(-1).clamp_min(1e-12)
            terms.append(weighted_mean(per_token, batch))
        return torch.stack(terms).mean()


class DistillClassificationTask(_Distill, ClassificationTask):
    """Image-classifier distillation: one teacher distribution per image (live, or stored with the
    augmentation seed so the stored target belongs to the very crop the student sees)."""

    def __init__(self, model: nn.Module, teacher: nn.Module | None, temperature: float = 1.0, kd_weight: float = 1.0,
                 ce_weight: float = 0.0) -> None:
        ClassificationTask.__init__(self, model)
        self._distill_init(teacher, temperature, kd_weight, ce_weight)

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        inputs = self.pipeline_inputs(batch)
        t_logits = None
        if "t_val" not in batch:
            with torch.no_grad():
                t_logits = self.teacher[0](inputs)
        return self.distill_loss(self.model(inputs), batch, t_logits)
