"""Data parallelism with ZeRO stages 0-3, plus the distributed gradient-norm clip.

* ZeRO-0/1: parameters stay replicated over ``dp`` (TP shards stay local
  DTensors); gradients are averaged with bucketed all-reduces after the last
  micro-batch. ZeRO-1 additionally partitions parameters among dp ranks: each
  rank keeps optimizer state for and updates only the parameters it owns, then
  owners broadcast the updated values. Working on local tensors (not on DDP)
  is what lets this compose with tensor and pipeline parallelism.
* ZeRO-2/3: FSDP2 ``fully_shard`` over the dp sub-mesh, per block and at the
  root; 2 keeps parameters gathered between forward and backward
  (``reshard_after_forward=False``), 3 re-shards them after forward.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate

from bigtrain.distributed.mesh import ParallelState


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _buckets(tensors: list[torch.Tensor], cap_bytes: int = 25 * 2**20) -> Iterator[list[torch.Tensor]]:
    """Consecutive same-dtype groups of at most ``cap_bytes`` (one flat collective each)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > cap_bytes or t.dtype != bucket[0].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _flat_collective(tensors: list[torch.Tensor], op: str, group: dist.ProcessGroup, src: int = 0, scale: float = 1.0) -> None:
    """All-reduce (sum, then scale) or broadcast a list of tensors through one flat buffer."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if op == "allreduce":
            dist.all_reduce(flat, group=group)
            if scale != 1.0:
                flat.mul_(scale)
        else:
            dist.broadcast(flat, src=src, group=group)
        offset = 0
        for t in bucket:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


class DataParallel:
    """What the trainer calls around backward and the optimizer step, for every ZeRO stage."""

    def __init__(self, model_parts: list[nn.Module], ps: ParallelState, zero: int) -> None:
        self.parts, self.ps, self.zero = model_parts, ps, zero
        self.params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
        self.group = ps.group("dp")
        self.owner: dict[int, int] = {}
        if ps.dp > 1 and zero <= 1:
            self._broadcast_from_dp0()
            if zero == 1:
                self._partition()

    # --- ZeRO-0/1 -------------------------------------------------------------------
    def _group_rank(self, dp_rank: int) -> int:
        return dist.get_global_rank(self.group, dp_rank)

    @torch.no_grad()
    def _broadcast_from_dp0(self) -> None:
        """Start from identical replicas, whatever each rank's init did (as DDP does)."""
        _flat_collective([_local(p) for p in self.params], "broadcast", self.group, src=self._group_rank(0))

    def _partition(self) -> None:
        """Greedy size-balanced assignment of whole parameters to dp ranks (deterministic)."""
        load = [0] * self.ps.dp
        order = sorted(range(len(self.params)), key=lambda i: (-_local(self.params[i]).numel(), i))
        for i in order:
            r = min(range(self.ps.dp), key=lambda k: (load[k], k))
            self.owner[i] = r
            load[r] += _local(self.params[i]).numel()

    def owns(self, index: int) -> bool:
        return self.zero != 1 or self.ps.dp == 1 or self.owner[index] == self.ps.dp_rank

    def no_sync(self, last_micro_batch: bool) -> contextlib.AbstractContextManager[None]:
        """Skip FSDP gradient reduction on all but the last micro-batch of a step."""
        if self.zero >= 2 and self.ps.dp > 1:
            for m in self.parts:
                if isinstance(m, FSDPModule):
                    m.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sync_grads(self) -> None:
        self._reduce_partial_grads()
        if self.ps.dp == 1 or self.zero >= 2:
            return  # FSDP reduce-scatters during backward
        grads = []
        for p in self.params:
            if p.grad is None:  # unused this step: contribute zeros so buckets line up across ranks
                p.grad = torch.zeros_like(p)
            grads.append(_local(p.grad))
        _flat_collective(grads, "allreduce", self.group, scale=1.0 / self.ps.dp)

    def _reduce_partial_grads(self) -> None:
        """Sequence-parallel norms leave ``Partial`` gradients (each TP rank saw only its
        tokens); reduce them now so norms, clipping and the update see the true gradient."""
        for p in self.params:
            g = p.grad
            if isinstance(g, DTensor) and any(pl.is_partial() for pl in g.placements):
                p.grad = g.redistribute(placements=[Replicate() if pl.is_partial() else pl for pl in g.placements])

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.zero != 1 or self.ps.dp == 1:
            optimizer.step()
            return
        for i, p in enumerate(self.params):
            if not self.owns(i):
                p.grad = None  # torch optimizers skip grad-less parameters: no state, no update
        optimizer.step()
        for r in range(self.ps.dp):
            owned = [_local(p) for i, p in enumerate(self.params) if self.owner[i] == r]
            if owned:
                _flat_collective(owned, "broadcast", self.group, src=self._group_rank(r))

    def drop_foreign_state(self, optimizer: torch.optim.Optimizer) -> None:
        """ZeRO-1: forget optimizer state of parameters another rank owns (after a load)."""
        if self.zero != 1 or self.ps.dp == 1:
            return
        for i, p in enumerate(self.params):
            if not self.owns(i):
                optimizer.state.pop(p, None)

    # --- all stages -------------------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm over every rank's gradients (DTensor-, FSDP- and PP-aware), then clip."""
        grads = [p.grad for p in self.params if p.grad is not None]
        # Sum of squares per set of mesh groups it must be reduced over: shards of a
        # DTensor are disjoint along Shard dims and identical along Replicate dims.
        by_groups: dict[tuple[dist.ProcessGroup, ...], list[torch.Tensor]] = {}
        for g in grads:
            groups: tuple[dist.ProcessGroup, ...] = ()
            if isinstance(g, DTensor):
                mesh = g.device_mesh
                # any non-Replicate placement is a split (FSDP over TP uses _StridedShard,
                # which is not a Shard); Partial grads were reduced in sync_grads
                groups = tuple(mesh.get_group(i) for i, pl in enumerate(g.placements) if not pl.is_replicate())
            by_groups.setdefault(groups, []).append(_local(g).detach())
        total_sq = torch.zeros((), dtype=torch.float64, device=self.ps.device)
        for groups, local in by_groups.items():
            # per-tensor norms in one multi-tensor kernel (as torch's clip_grad_norm_), summed in fp64
            sq = torch.stack(torch._foreach_norm(local)).double().pow(2).sum()
            for group in groups:
                dist.all_reduce(sq, group=group)
            total_sq += sq
        if self.ps.pp > 1:  # each pipeline stage holds different parameters
            dist.all_reduce(total_sq, group=self.ps.group("pp"))
        norm = float(total_sq.sqrt())
        if max_norm > 0 and math.isfinite(norm):
            coef = min(1.0, max_norm / (norm + 1e-6))
            if coef < 1.0:
                for g in grads:
                    g.mul_(coef)
        return norm


def apply_fsdp(blocks: list[nn.Module], root: nn.Module, ps: ParallelState, zero: int, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the dp sub-mesh: each block is one unit, the root holds the rest."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    mesh = ps.submesh("dp")
    reshard = zero == 3
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
