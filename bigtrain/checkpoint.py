"""Sharded checkpoints (torch.distributed.checkpoint) with an atomic commit.

Layout::

    run_dir/checkpoints/step_00000100/     complete checkpoint (DCP files + marker)
        .metadata, __0_0.distcp, ...
        bigtrain_complete.json            written last; {"step": ..., "world_size": ...}
    run_dir/checkpoints/.tmp_step_00000200/ a save in progress (never loaded)

A save writes into the temporary directory; only after every rank finished
writing does rank 0 write the marker and rename the directory, so a crash,
``kill -9`` or preemption at any point leaves either the previous complete
checkpoint or the new complete one, never a half-written one that resume picks.

Stateful keys are fixed: ``model``, ``optimizer``, ``lr_schedule``,
``dataloader``, ``trainer``, ``rng``. Non-tensor values are read back with
``torch.load(weights_only=True)``: loading never unpickles arbitrary objects.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

log = logging.getLogger(__name__)

MARKER = "bigtrain_complete.json"
STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_KEYS = ("model", "optimizer", "lr_schedule", "dataloader", "trainer", "rng")


class CheckpointError(RuntimeError):
    pass


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner unpickles non-tensor values with weights_only=False; we don't."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = torch.load(value, weights_only=True)


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


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _single_process_ok() -> Iterator[None]:
    """DCP warns whenever it runs without a process group; single-process DCP is deliberate here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def list_complete(ckpt_root: str) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint, oldest first."""
    if not os.path.isdir(ckpt_root):
        return []
    found = []
    for name in os.listdir(ckpt_root):
        m = STEP_DIR.match(name)
        path = os.path.join(ckpt_root, name)
        if m and is_complete(path):
            found.append((int(m.group(1)), path))
    return sorted(found)


def resolve_resume(ckpt_root: str, resume: str) -> str | None:
    """``auto`` -> latest complete or None; ``never`` -> None; else a path that must be complete."""
    if resume == "never":
        return None
    if resume == "auto":
        found = list_complete(ckpt_root)
        return found[-1][1] if found else None
    if not os.path.isdir(resume):
        raise CheckpointError(f"resume={resume!r}: no such checkpoint directory")
    if not is_complete(resume):
        raise CheckpointError(f"resume={resume!r} is not a complete checkpoint (no {MARKER}); refusing to load it")
    return resume


class Checkpointer:
    """Saves/loads the fixed stateful keys under ``run_dir/checkpoints``."""

    def __init__(
        self,
        run_dir: str,
        keep_last: int = 3,
        keep_every: int = 0,
        rank: int = 0,
        world_size: int = 1,
        barrier: Callable[[], None] = lambda: None,
    ) -> None:
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last, self.keep_every = keep_last, keep_every
        self.rank, self.world_size, self.barrier = rank, world_size, barrier

    def latest(self) -> str | None:
        return resolve_resume(self.root, "auto")

    def resolve(self, resume: str) -> str | None:
        return resolve_resume(self.root, resume)

    def save(self, step: int, state: dict[str, Stateful], extra: dict[str, Any] | None = None) -> str:
        t0 = time.perf_counter()
        final = os.path.join(self.root, step_dir_name(step))
        tmp = os.path.join(self.root, ".tmp_" + step_dir_name(step))
        if self.rank == 0:
            os.makedirs(self.root, exist_ok=True)
            if os.path.exists(tmp):  # left over by a crashed save of the same step
                shutil.rmtree(tmp)
        self.barrier()
        with _single_process_ok():
            dcp.save(state, checkpoint_id=tmp, no_dist=not _distributed())
        self.barrier()  # every rank's shard is on disk before the commit
        if self.rank == 0:
            meta = {"step": step, "world_size": self.world_size, "time": time.time(), "keys": sorted(state), **(extra or {})}
            marker = os.path.join(tmp, MARKER)
            with open(marker, "w") as f:
                json.dump(meta, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            _fsync_dir(tmp)
            if os.path.exists(final):  # same step saved by an earlier run in this dir
                shutil.rmtree(final)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.barrier()
        log.info("saved checkpoint %s in %.2fs", final, time.perf_counter() - t0)
        return final

    def load(self, path: str, state: dict[str, Stateful]) -> dict[str, Any]:
        if not is_complete(path):
            raise CheckpointError(f"{path} is not a complete checkpoint")
        with _single_process_ok():
            dcp.load(state, checkpoint_id=path, planner=SafeLoadPlanner(), no_dist=not _distributed())
        with open(os.path.join(path, MARKER)) as f:
            return json.load(f)

    def _prune(self) -> None:
        found = list_complete(self.root)
        if self.keep_last <= 0:
            return
        for step, path in found[: -self.keep_last]:
            if self.keep_every and step % self.keep_every == 0:
                continue
            shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.root):  # stale temporaries of older steps
            if name.startswith(".tmp_step_"):
                m = STEP_DIR.match(name[len(".tmp_") :])
                if m and found and int(m.group(1)) < found[-1][0]:
                    shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
