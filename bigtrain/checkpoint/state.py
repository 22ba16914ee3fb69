"""What goes into a checkpoint: Stateful adapters for each key, and the load planners."""

from __future__ import annotations

import io
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from bigtrain.checkpoint.integrity import IncompatibleCheckpoint

# Keys whose content must match the checkpoint exactly (no extra, no missing entries);
# other keys (per-rank RNG streams, components added later) may be absent.
STRICT_KEYS = ("model", "optimizer")


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor values with weights_only=False; we don't."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


class StrictLoadPlanner(SafeLoadPlanner):
    """Refuses a checkpoint whose ``model.*`` / ``optimizer.*`` entries no rank asks for.

    DCP already fails on entries a rank asks for and the checkpoint lacks, but silently
    ignores entries the checkpoint has and nobody reads (a depth-4 checkpoint loaded into
    a depth-2 model). Each rank only holds its part (pipeline stages, ZeRO-1 partitions),
    so the check runs on the coordinator, over the union of every rank's read plan.
    """

    def __init__(self, strict_prefixes: tuple[str, ...]) -> None:
        super().__init__()
        self.strict_prefixes = tuple(p + "." for p in strict_prefixes)

    def create_global_plan(self, global_plan: list[LoadPlan]) -> list[LoadPlan]:
        wanted = {item.dest_index.fqn for plan in global_plan for item in plan.items}
        saved = [k for k in self.metadata.state_dict_metadata if k.startswith(self.strict_prefixes)]  # type: ignore[union-attr]
        unread = sorted(k for k in saved if k not in wanted)
        if unread:
            raise IncompatibleCheckpoint(
                f"the checkpoint holds {len(unread)} entries this run has no place for, e.g. {unread[:3]} "
                "(a different model or optimizer; use init=PATH to load matching weights into a new run)")
        return super().create_global_plan(global_plan)


class ModelState(Stateful):
    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.model)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state_dict)


class OptimizerState(Stateful):
    """Optimizer state keyed by parameter FQN, so it survives re-sharding."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state_dict)


class ScalarState(Stateful):
    """Adapts an object with int/float ``state_dict()`` to tensors (no pickled scalars on disk)."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for k, v in self.obj.state_dict().items():
            out[k] = torch.tensor(v, dtype=torch.float64 if isinstance(v, float) else torch.int64)
        return out

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.obj.load_state_dict({k: v.item() for k, v in state_dict.items()})


class RNGState(Stateful):
    """This rank's torch RNG streams (dropout etc.), under a per-rank key."""

    def __init__(self, rank: int = 0) -> None:
        self.key = f"rank{rank}"

    def state_dict(self) -> dict[str, Any]:
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return {self.key: state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = state_dict[self.key]
        torch.set_rng_state(state["cpu"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])
