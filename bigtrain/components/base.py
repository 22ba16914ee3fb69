"""The training-component protocol."""

from __future__ import annotations

import contextlib
from typing import Protocol, runtime_checkable

from torch.distributed.checkpoint.stateful import Stateful

CORE_KEYS = ("model", "optimizer", "lr_schedule", "dataloader", "trainer", "rng")


@runtime_checkable
class TrainComponent(Protocol):
    """State the trainer carries for someone else.

    * ``name``: its checkpoint key (not one of the six core keys). Its state may be missing from
      checkpoints written before it existed: the load then keeps the fresh state and logs it.
    * ``stateful()``: what is saved under that key (a DCP ``Stateful``; DTensors for sharded
      state, so it reshards like the parameters), or None for nothing.
    * ``after_optimizer_step(step)``: called after every *accepted* optimizer step (never for a
      step the numerical guard skipped), once the parameters are final on every rank (after
      ZeRO-1's broadcast), with the number of the step just completed.
    * ``evaluation()``: a context the trainer evaluates in (e.g. EMA weights swapped in), or a
      null context.
    * optionally ``on_absent_state()``: called when a checkpoint without this component's state was
      loaded, so it can start from the loaded model (e.g. EMA := the loaded weights).
    """

    name: str

    def stateful(self) -> Stateful | None: ...

    def after_optimizer_step(self, step: int) -> None: ...

    def evaluation(self) -> contextlib.AbstractContextManager[None]: ...
