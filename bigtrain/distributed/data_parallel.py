"""Data parallelism with ZeRO stages 0-3, plus the global gradient norm and its clip.

* ZeRO-0/1: parameters stay replicated over ``dp`` (TP shards stay local
  DTensors); gradients are averaged with bucketed all-reduces that run while
  the last micro-batch's backward still computes (after it, under PP). ZeRO-1 additionally partitions parameters among dp ranks: each
  rank keeps optimizer state for and updates only the parameters it owns, then
  owners broadcast the updated values. Working on local tensors (not on DDP)
  is what lets this compose with tensor and pipeline parallelism.
* ZeRO-2/3: FSDP2 ``fully_shard`` over the dp sub-mesh, per block and at the
  root; 2 keeps parameters gathered between forward and backward
  (``reshard_after_forward=False``), 3 re-shards them after forward.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from typing import Any

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


def _flat_collective(tensors: list[torch.Tensor], op: str, group: dist.ProcessGroup, src: int = 0, scale: float = 1.0,
                     reduce_op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> None:
    """All-reduce (``reduce_op``, sum by default, then scale) or broadcast a list of tensors through
    one flat buffer."""
    for bucket in _buckets(tensors):
        flat = torch.cat([t.reshape(-1) for t in bucket])
        if op == "allreduce":
            dist.all_reduce(flat, op=reduce_op, group=group)
            if scale != 1.0:
                flat.mul_(scale)
        else:
            dist.broadcast(flat, src=src, group=group)
        _unflatten_into(flat, bucket)


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Copy consecutive pieces of ``flat`` back into ``tensors`` (the inverse of their torch.cat)."""
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


class OverlappedAllReduce:
    """ZeRO-0/1 gradient averaging that runs while backward still computes, as DDP does.

    Parameters are grouped into buckets (about ``cap_bytes`` each) in reverse registration order,
    the order backward produces their gradients. A post-accumulate-grad hook counts each
    parameter's gradient in during the step's last micro-batch; a bucket whose gradients are all
    there is flattened and all-reduced asynchronously. Buckets are launched strictly in index
    order, so every rank issues the same collectives in the same order whatever order its hooks
    fire in. :meth:`finish` launches what backward did not complete (parameters that got no
    gradient contribute zeros), waits, and writes the averages back.
    """

    def __init__(self, params: list[torch.Tensor], group: dist.ProcessGroup, scale: float,
                 cap_bytes: int = 25 * 2**20) -> None:
        self.params, self.group, self.scale = params, group, scale
        order = list(reversed(range(len(params))))
        self.buckets: list[list[int]] = []
        for bucket in _buckets([_local(params[i]) for i in order], cap_bytes):
            start = sum(len(b) for b in self.buckets)
            self.buckets.append(order[start : start + len(bucket)])
        self.bucket_of = {i: b for b, idx in enumerate(self.buckets) for i in idx}
        self.remaining = [len(b) for b in self.buckets]
        self.launched: list[tuple[torch.Tensor, Any]] = []
        self.armed = False
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._ready, i)) for i, p in enumerate(params)]

    def arm(self) -> None:
        """The next backward is the step's last: reduce as gradients become final."""
        self.armed = True
        self.remaining = [len(b) for b in self.buckets]
        self.launched = []

    def _ready(self, index: int, param: torch.Tensor) -> None:
        if not self.armed:
            return
        self.remaining[self.bucket_of[index]] -= 1
        while len(self.launched) < len(self.buckets) and self.remaining[len(self.launched)] == 0:
            self._launch(len(self.launched))

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        grads = []
        for i in self.buckets[b]:
            p = self.params[i]
            if p.grad is None:  # unused this step: zeros keep the buckets equal across ranks
                p.grad = torch.zeros_like(p)
            grads.append(_local(p.grad))
        flat = torch.cat([g.reshape(-1) for g in grads])
        self.launched.append((flat, dist.all_reduce(flat, group=self.group, async_op=True)))

    @torch.no_grad()
    def finish(self) -> None:
        self.armed = False
        for b in range(len(self.launched), len(self.buckets)):
            self._launch(b)
        for b, (flat, work) in enumerate(self.launched):
            work.wait()
            if self.scale != 1.0:
                flat.mul_(self.scale)
            _unflatten_into(flat, [_local(self.params[i].grad) for i in self.buckets[b]])
        self.launched = []


class DataParallel:
    """What the trainer calls around backward and the optimizer step, for every ZeRO stage."""

    def __init__(self, model_parts: list[nn.Module], ps: ParallelState, zero: int) -> None:
        self.parts, self.ps, self.zero = model_parts, ps, zero
        self.params = [p for m in model_parts for p in m.parameters() if p.requires_grad]
        self.group = ps.group("dp")
        self.owner: dict[int, int] = {}
        self.overlap: OverlappedAllReduce | None = None
        if ps.dp > 1 and zero <= 1:
            self._broadcast_from_dp0()
            if zero == 1:
                self._partition()
            if ps.pp == 1:  # a pipeline schedule runs many backwards per step: reduce after it instead
                self.overlap = OverlappedAllReduce(self.params, self.group, 1.0 / ps.dp)

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
        """Reduce gradients only during the last micro-batch's backward (ZeRO-0/1: overlapped
        bucketed all-reduce; ZeRO-2/3: FSDP's reduce-scatter)."""
        if self.overlap is not None and last_micro_batch:
            self.overlap.arm()
        if self.ps.uses_fsdp(self.zero):
            for m in self.parts:
                if isinstance(m, FSDPModule):
                    m.set_requires_gradient_sync(last_micro_batch)
        return contextlib.nullcontext()

    @torch.no_grad()
    def sync_grads(self) -> None:
        if self.overlap is not None:
            self.overlap.finish()  # dp averages first: the sequence-parallel reduction below is linear
            self._reduce_partial_grads()
            return
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
    def grad_sq_share(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm (fp64, 0-dim, on the device).

        Summed over every rank of the world it is the squared norm of the whole model's gradient
        (DTensor-, FSDP-, TP- and PP-aware): each local piece is weighted by 1 / the number of
        ranks holding an identical copy of it — a plain (replicated) gradient has dp x tp copies in
        its pipeline stage, a DTensor one dp x tp / the sizes of the mesh dims that split it (any
        non-Replicate placement; FSDP over TP uses _StridedShard, not a Shard). So the norm travels
        in the step's one reduction with the logs and the control flags, not in collectives of its own."""
        copies = self.ps.dp * self.ps.tp
        by_weight: dict[float, list[torch.Tensor]] = {}
        for p in self.params:
            g = p.grad
            if g is None:
                continue
            split = 1
            if isinstance(g, DTensor):  # Partial gradients were reduced in sync_grads
                split = math.prod(g.device_mesh.size(i) for i, pl in enumerate(g.placements) if not pl.is_replicate())
            by_weight.setdefault(split / copies, []).append(_local(g).detach())
        total = torch.zeros((), dtype=torch.float64, device=self.ps.device)
        for weight, local in by_weight.items():
            # per-tensor norms in one multi-tensor kernel (as torch's clip_grad_norm_), summed in fp64
            total += torch.stack(torch._foreach_norm(local)).double().pow(2).sum() * weight
        return total

    @torch.no_grad()
    def clip_grads(self, norm: float, max_norm: float) -> None:
        """Scale every gradient so the global norm (already reduced) is at most ``max_norm``."""
        if max_norm > 0 and math.isfinite(norm) and max_norm / (norm + 1e-6) < 1.0:
            grads = [_local(p.grad) for p in self.params if p.grad is not None]
            torch._foreach_mul_(grads, max_norm / (norm + 1e-6))


def apply_fsdp(blocks: list[nn.Module], root: nn.Module, ps: ParallelState, zero: int, param_dtype: torch.dtype | None) -> None:
    """FSDP2 over the dp sub-mesh: each block is one unit, the root holds the rest."""
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else MixedPrecisionPolicy()
    mesh = ps.submesh("dp")
    reshard = zero == 3
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
    fully_shard(root, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
