"""Pipeline parallelism with ``torch.distributed.pipelining``.

The model is split by ranges of blocks into ``pp * stages_per_rank`` stages; the
first stage keeps the embedding, the last the norm/pooling/head. Each stage is
parallelized on its own (TP, activation checkpointing, FSDP over dp) before it
is wrapped in a ``PipelineStage``. Schedules: GPipe, 1F1B (one stage per rank),
Interleaved 1F1B (stages ``r, r+pp, ...`` on rank r) and ZBV zero-bubble (two
stages per rank in a V: ``r`` and ``2pp-1-r``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import (
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
    _PipelineSchedule,
)

from bigtrain.config import ConfigError
from bigtrain.config.schema import ParallelConfig
from bigtrain.distributed.mesh import ParallelState

SINGLE = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
MULTI = {"interleaved_1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble}


def stages_per_rank(cfg: ParallelConfig) -> int:
    v = cfg.pp_stages_per_rank or (2 if cfg.pp_schedule in MULTI else 1)
    if cfg.pp_schedule in SINGLE and v != 1:
        raise ConfigError(f"parallel.pp_schedule={cfg.pp_schedule} runs one stage per rank; set parallel.pp_stages_per_rank=1")
    if cfg.pp_schedule == "zbv" and v != 2:
        raise ConfigError("parallel.pp_schedule=zbv runs exactly two stages per rank (a V); set parallel.pp_stages_per_rank=2")
    if cfg.pp_schedule == "zbv" and cfg.zero >= 2:
        # Measured: with FSDP (ZeRO-2/3) the ZBV schedule's split weight-gradient pass
        # leaves every gradient at zero here; refuse rather than train silently wrong.
        raise ConfigError("parallel.pp_schedule=zbv with parallel.zero >= 2 is not supported; use zero 0/1 or another schedule")
    if cfg.pp_schedule == "interleaved_1f1b" and v < 2:
        raise ConfigError("parallel.pp_schedule=interleaved_1f1b needs parallel.pp_stages_per_rank >= 2")
    return v


def split_blocks(names: list[str], num_stages: int, split: list[int]) -> list[list[str]]:
    """Block names of each stage: balanced, or starting at the given block indices."""
    n = len(names)
    if num_stages > n:
        raise ConfigError(f"model has {n} blocks, too few for {num_stages} pipeline stages (parallel.pp x stages per rank)")
    if split:
        starts = [0, *split]
        if len(starts) != num_stages or any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= n:
            raise ConfigError(
                f"config key 'parallel.pp_split' {split} must list {num_stages - 1} increasing block indices in (0, {n})"
            )
    else:
        base, extra = divmod(n, num_stages)
        sizes = [base + (1 if i < extra else 0) for i in range(num_stages)]
        starts = [sum(sizes[:i]) for i in range(num_stages)]
    ends = [*starts[1:], n]
    return [names[a:b] for a, b in zip(starts, ends)]


def rank_stage_ids(pp_rank: int, pp: int, v: int, schedule: str) -> list[int]:
    if schedule == "zbv":
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(v)]


class Pipeline:
    """This rank's stages, the schedule, and a schedule-free forward for evaluation."""

    def __init__(
        self,
        ps: ParallelState,
        cfg: ParallelConfig,
        build_stage: Callable[[list[str], bool, bool], nn.Module],
        block_names: list[str],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        n_microbatches: int,
    ) -> None:
        self.ps = ps
        v = stages_per_rank(cfg)
        self.num_stages = ps.pp * v
        layout = split_blocks(block_names, self.num_stages, cfg.pp_split)
        self.stage_ids = rank_stage_ids(ps.pp_rank, ps.pp, v, cfg.pp_schedule)
        # pp-group rank holding each stage
        self.owner = {sid: r for r in range(ps.pp) for sid in rank_stage_ids(r, ps.pp, v, cfg.pp_schedule)}
        self.parts: list[nn.Module] = []
        self.stages: list[PipelineStage] = []
        group = ps.group("pp")
        for sid in self.stage_ids:
            part = build_stage(layout[sid], sid == 0, sid == self.num_stages - 1)
            self.parts.append(part)
            self.stages.append(PipelineStage(part, sid, self.num_stages, ps.device, group=group))
        _skip_self_p2p_warmup(self.stages, ps.pp_rank)
        if cfg.pp_schedule in SINGLE:
            self.schedule = SINGLE[cfg.pp_schedule](self.stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
        else:
            self.schedule = MULTI[cfg.pp_schedule](self.stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
        self.has_first = 0 in self.stage_ids
        self.has_last = self.num_stages - 1 in self.stage_ids
        self.layout = layout

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor]:
        """One training step over the local batch; per-micro-batch losses (on the last stage)."""
        losses: list[torch.Tensor] = []
        args = (inputs,) if self.has_first else ()
        self.schedule.step(*args, target=target if self.has_last else None, losses=losses)
        return losses

    # --- evaluation: plain stage-by-stage forward, independent of the schedule ---------
    @torch.no_grad()
    def forward_eval(self, x: torch.Tensor, **kwargs: Any) -> Any:
        """Run the stages in order with point-to-point transfers; every pp rank gets the last output."""
        group = self.ps.group("pp")
        me = self.ps.pp_rank
        out: Any = None
        for sid in range(self.num_stages):
            owner = self.owner[sid]
            if sid > 0:
                prev = self.owner[sid - 1]
                if prev != owner:
                    if me == prev:
                        _send(out, owner, group)
                    elif me == owner:
                        out = _recv(prev, group, self.ps.device)
            if me == owner:
                part = self.parts[self.stage_ids.index(sid)]
                out = part(x if sid == 0 else out, **(kwargs if sid == self.num_stages - 1 else {}))
        last = self.owner[self.num_stages - 1]
        return _broadcast(out if me == last else None, last, group, self.ps.device)


_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def _skip_self_p2p_warmup(stages: list[PipelineStage], me: int) -> None:
    """Before torch 2.13 the schedules open each stage's links with a dummy send/recv to both
    neighbours, including a neighbour stage on the *same* rank (ZBV's V turns on the last rank):
    gloo cannot send to itself ("Pair is not connected") and fails the first step. Those two
    stages exchange activations locally during the schedule anyway, so the warm-up ops whose peer
    is this rank are dropped. 2.13 replaced that warm-up (``_warmup_p2p``) and needs nothing."""
    if hasattr(_PipelineSchedule, "_warmup_p2p"):
        return
    for stage in stages:
        own = stage._get_init_p2p_neighbors_ops

        def ops(own: Callable[[], list[dist.P2POp]] = own) -> list[dist.P2POp]:
            return [op for op in own() if op.group_peer != me]

        stage._get_init_p2p_neighbors_ops = ops  # type: ignore[method-assign]


def _send(t: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    """Send a tensor of any shape: header (dtype, ndim, shape), then the data."""
    header = torch.tensor([_DTYPES.index(t.dtype), t.ndim, *t.shape], dtype=torch.int64, device=t.device)
    dist.send(torch.tensor([header.numel()], device=t.device), group=group, group_dst=dst)
    dist.send(header, group=group, group_dst=dst)
    dist.send(t.contiguous(), group=group, group_dst=dst)


def _recv(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    n = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(n, group=group, group_src=src)
    header = torch.zeros(int(n), dtype=torch.int64, device=device)
    dist.recv(header, group=group, group_src=src)
    t = torch.empty(*header[2:].tolist(), dtype=_DTYPES[int(header[0])], device=device)
    dist.recv(t, group=group, group_src=src)
    return t


def _broadcast(obj: Any, src: int, group: dist.ProcessGroup, device: torch.device) -> Any:
    """The last stage's output (a tensor or a tuple of tensors) on every pp rank, as tensors on this
    rank's device: a header (tuple or not, then dtype, ndim and shape of each), then the data. Not
    ``broadcast_object_list``, which pickles CUDA tensors so they arrive on the sender's device index."""
    me = dist.get_rank(group)
    if me == src:
        tensors = list(obj) if isinstance(obj, (tuple, list)) else [obj]
        meta = [int(isinstance(obj, (tuple, list))), len(tensors)]
        for t in tensors:
            meta += [_DTYPES.index(t.dtype), t.ndim, *t.shape]
        header = torch.tensor(meta, dtype=torch.int64, device=device)
        size = torch.tensor([header.numel()], dtype=torch.int64, device=device)
    else:
        size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.broadcast(size, group=group, group_src=src)
    if me != src:
        header = torch.zeros(int(size), dtype=torch.int64, device=device)
    dist.broadcast(header, group=group, group_src=src)
    fields = header.tolist()
    is_tuple, count, at, out = fields[0], fields[1], 2, []
    for i in range(count):
        dtype, ndim = _DTYPES[fields[at]], fields[at + 1]
        shape, at = fields[at + 2:at + 2 + ndim], at + 2 + ndim
        t = tensors[i].contiguous() if me == src else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(t, group=group, group_src=src)
        out.append(t)
    return tuple(out) if is_tuple else out[0]


class PipelineModel(nn.Module):
    """This rank's stages as one module for evaluation: ``model(images, with_features=True)``
    runs the whole pipeline and returns the last stage's output on every pp rank."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.parts = nn.ModuleList(pipeline.parts)
        self._pipeline = [pipeline]  # a list: keep it out of the module tree

    def forward(self, x: torch.Tensor, **kwargs: Any) -> Any:
        return self._pipeline[0].forward_eval(x, **kwargs)


def merge_parts(parts: list[nn.Module]) -> nn.Module:
    """One module exposing every part's parameters under their original names.

    Stages keep their blocks' global names (``blocks.5``), so the union of the
    parts of a rank is a partial model with the same keys as the unsplit one:
    checkpoints and optimizer state stay layout-independent.
    """
    if len(parts) == 1:
        return parts[0]
    root = nn.Module()
    for part in parts:
        for name, child in part.named_children():
            if isinstance(child, nn.ModuleDict):
                if name not in root._modules:
                    root.add_module(name, nn.ModuleDict())
                merged = root._modules[name]
                for key, sub in child.items():
                    merged[key] = sub
            elif name not in root._modules or root._modules[name] is None:
                root.add_module(name, child)
        for name, p in part.named_parameters(recurse=False):
            root.register_parameter(name, p)
        for name, b in part.named_buffers(recurse=False):
            root.register_buffer(name, b)
    return root
