"""Exponential moving average of the weights, as a training component.

``shadow = decay * shadow + (1 - decay) * param`` after every accepted optimizer step (``decay``
optionally warmed up from 0, see :meth:`EMA.current_decay`; the update count is saved). The
shadow copies have each parameter's type and placement (a DTensor shard under FSDP or TP, the
local stage's parameters under PP), so the update is elementwise on whatever this rank holds,
and the checkpoint (key ``ema``, entries named by parameter) reshards like the model. With
``use_for_eval`` the evaluation runs with the shadow weights swapped in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from bigtrain.distributed.activation import clean_name


class EMA:
    name = "ema"

    def __init__(self, model: nn.Module, decay: float, use_for_eval: bool = True, warmup_power: float = 0.0) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        if warmup_power < 0:
            raise ValueError(f"EMA warm-up power must be >= 0, got {warmup_power}")
        self.decay, self.use_for_eval, self.warmup_power = decay, use_for_eval, warmup_power
        self.params = {clean_name(n): p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update: fixed, or with warm-up (diffusers' EMAModel, inv_gamma 1)
        min(decay, 1 - (1 + n)^-power) after n updates. It starts at 0 (the first update copies the
        weights), so a short run's average is not dominated by the initialisation."""
        if not self.warmup_power:
            return self.decay
        return min(self.decay, 1.0 - (1.0 + self.updates) ** -self.warmup_power)

    @torch.no_grad()
    def after_optimizer_step(self, step: int) -> None:
        weight = 1.0 - self.current_decay()
        names = list(self.params)
        # one fused update over every local shard (a DTensor shadow and its parameter share placements,
        # so their local tensors match), not one kernel launch per parameter
        torch._foreach_lerp_([_local(self.shadow[n]) for n in names], [_local(self.params[n].detach()) for n in names],
                             weight)
        self.updates += 1

    @torch.no_grad()
    def on_absent_state(self) -> None:
        """Resumed from a checkpoint without an EMA: average from the loaded weights on."""
        for name, p in self.params.items():
            self.shadow[name].copy_(p)

    def stateful(self) -> Stateful:
        return _EMAState(self)

    @contextlib.contextmanager
    def evaluation(self) -> Iterator[None]:
        if not self.use_for_eval:
            yield
            return
        with torch.no_grad():
            backup = {n: p.detach().clone() for n, p in self.params.items()}
            for n, p in self.params.items():
                p.copy_(self.shadow[n])
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _EMAState(Stateful):
    def __init__(self, ema: EMA) -> None:
        self.ema = ema

    def state_dict(self) -> dict[str, Any]:
        return {"updates": torch.tensor(self.ema.updates), "params": dict(self.ema.shadow)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ema.updates = int(state_dict["updates"])
        with torch.no_grad():
            for name, value in state_dict["params"].items():
                if value is not self.ema.shadow[name]:  # DCP loads in place; a copy only if it was replaced
                    self.ema.shadow[name].copy_(value)
