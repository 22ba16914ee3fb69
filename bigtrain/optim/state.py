"""Loading optimizer state without torch's dtype policy.

``torch.optim.Optimizer.load_state_dict`` casts every floating-point state tensor to its parameter's
dtype. For optimizers whose state is deliberately narrower than the parameter — the factored
optimizer's bf16 momentum, the 8-bit optimizer's fp32 absmax next to bf16 parameters — that cast
allocates a full-size copy at load time (ViT-G/14: 7.7 GB for the momentum, enough to OOM a resume
that trained fine) and silently changes the state's dtype, so a resumed run no longer rounds like the
uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from itertools import chain
from typing import Any

import torch


class KeepStateDtypes:
    """Mixin for ``torch.optim.Optimizer`` subclasses: ``load_state_dict`` keeps each state tensor's
    saved dtype (moved to the parameter's device only); parameter groups load as torch loads them."""

    state: Any
    param_groups: list[dict[str, Any]]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["state"]
        super().load_state_dict({**state_dict, "state": {}})  # type: ignore[misc]  # groups: torch's checks
        ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for pid, p in zip(ids, params):
            if pid in saved:
                # the step counter stays on the host: the update reads it as a Python number once per
                # parameter per step, which on a CUDA tensor would be a device sync each time
                self.state[p] = {k: v.to(device="cpu" if k == "step" and v.dim() == 0 else p.device)
                                 if torch.is_tensor(v) else v for k, v in saved[pid].items()}


def params_to_step(optimizer: torch.optim.Optimizer, init: Callable[[torch.Tensor, dict[str, Any]], dict[str, Any]],
                   ) -> Iterator[tuple[torch.Tensor, dict[str, Any], dict[str, Any]]]:
    """(parameter, group, state) of every parameter with a gradient, its state created by
    ``init(p, group)`` on first use and its ``step`` counter advanced (ZeRO-1 leaves the parameters
    another rank owns without a gradient: they get no state and no update)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            state = optimizer.state[p]
            if not state:
                state.update(init(p, group))
            state["step"] += 1
            yield p, group, state
