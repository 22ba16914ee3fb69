"""The factored optimizer of "Scaling Vision Transformers": big_vision's ``scale_by_adafactor``,
on whole or sharded (DTensor) parameters.

Per parameter, with t = 1, 2, ... and G2 = g^2 + 1e-30:

* beta2(t) = min(0.999, 1 - t^-0.8) (no bias correction: the first step sees beta2 = 0);
* if the parameter has >= 2 dims and its second-largest dim is >= ``min_dim_size_to_factor``, the
  second moment is factored over its two largest dims d0 (largest) and d1: EMAs of mean_d0(G2)
  ("row", the shape without d0) and mean_d1(G2) ("col", the shape without d1), and the update is
  u = g * (row / mean_d1(row))^-1/2 * col^-1/2 (row broadcast along d0, col along d1);
  otherwise an elementwise EMA v of G2 and u = g * v^-1/2;
* optional update clipping: u / max(1, RMS(u) / ``clip_threshold``) (off by default, as for ViT-g);
* momentum: m = beta1 * m + (1 - beta1) * u, an EMA without debiasing, stored in ``momentum_dtype``
  (bf16 by default); the unrounded m is the update. With ``decay_in_momentum_dtype`` (the default)
  the term beta1 * m is computed as JAX computes it in big_vision (optax's ``ema`` multiplies the
  bf16 state by the weakly typed Python float): beta1 rounded to bf16 (0.9 -> 0.8984375), the product
  rounded to bf16, then added to the fp32 (1 - beta1) * u. Without it, beta1 * m is exact fp32 (the
  EMA then decays at 0.9 as written; the stored momentum of big_vision's is ~1.5% smaller);
* parameter update: p <- p - lr_t * m - s_t * wd * p, with lr_t = the group's scheduled LR and
  s_t = lr_t / its base LR (the schedule's relative factor): weight decay is decoupled and absolute,
  scaled by the schedule, not by the base LR — as big_vision applies it.

The factoring decision uses the global shape. Sharded parameters: the statistics that average over
a dim are local sums, all-reduced over exactly the mesh dims that split that dim and divided by the
global size, one flat all-reduce per mesh dim per step for all parameters together. mean_d1(row)
is kept as its own EMA of mean_{d0,d1}(G2) (equal to it in exact arithmetic, both start at 0), so it
travels in the same all-reduce. Every state tensor is a DTensor with the parameter's placements (the
reduced dims replicated), so DCP reshards it on an elastic resume; plain parameters keep plain state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement, Shard, _StridedShard

from bigtrain.distributed.data_parallel import _flat_collective, _local
from bigtrain.optim.state import KeepStateDtypes, params_to_step

EPS = 1e-30
STATS = ("row", "col", "norm")  # factored statistics: which dims each averages over is in _removed()


def factored_dims(shape: tuple[int, ...], min_dim: int) -> tuple[int, int] | None:
    """(d0, d1): the largest and second-largest dims (ties: the later index is d0, as numpy's stable
    argsort gives), or None when the tensor is not factored."""
    if len(shape) < 2:
        return None
    order = sorted(range(len(shape)), key=lambda d: shape[d])
    d1, d0 = order[-2], order[-1]
    return (d0, d1) if shape[d1] >= min_dim else None


def _removed(stat: str, d0: int, d1: int) -> tuple[int, ...]:
    return {"row": (d0,), "col": (d1,), "norm": (d0, d1)}[stat]


def _sharded_dim(pl: Placement) -> int | None:
    if isinstance(pl, _StridedShard) or isinstance(pl, Shard):
        return pl.dim
    return None


def _reduced_placement(pl: Placement, removed: tuple[int, ...]) -> Placement:
    """The placement of a statistic that averaged ``removed`` dims away, on the same mesh dim."""
    dim = _sharded_dim(pl)
    if dim is None:
        return pl
    if dim in removed:
        return Replicate()  # the all-reduce made it whole along this mesh dim
    new = dim - sum(r < dim for r in removed)
    return _StridedShard(new, split_factor=pl.split_factor) if isinstance(pl, _StridedShard) else Shard(new)


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(shape):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


class Factored(KeepStateDtypes, torch.optim.Optimizer):
    """See the module docstring. Groups carry ``lr``, ``base_lr`` (the LR the schedule scales) and
    ``weight_decay`` (absolute, per step at the schedule's peak); ``param_wd`` optionally maps a
    parameter to its own weight decay (``optim.wd_mults``)."""

    def __init__(
        self, params: Iterable[Any], lr: float = 1e-3, beta1: float = 0.9, min_dim_size_to_factor: int = 32,
        decay_rate: float = 0.8, beta2_cap: float = 0.999, clip_threshold: float = 0.0,
        momentum_dtype: torch.dtype = torch.bfloat16, weight_decay: float = 0.0, decay_in_momentum_dtype: bool = True,
    ) -> None:
        defaults = {"lr": lr, "base_lr": lr, "beta1": beta1, "min_dim": min_dim_size_to_factor, "decay_rate": decay_rate,
                    "beta2_cap": beta2_cap, "clip_threshold": clip_threshold, "weight_decay": weight_decay}
        super().__init__(params, defaults)
        # not in the param groups: they are saved in checkpoints, where only plain numbers belong
        self.momentum_dtype = momentum_dtype
        self.decay_in_momentum_dtype = decay_in_momentum_dtype
        self.param_wd: dict[torch.Tensor, float] = {}

    # --- state ---------------------------------------------------------------------------
    def _init_state(self, p: torch.Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        dims = factored_dims(tuple(p.shape), group["min_dim"])
        if dims is None:
            state["v"] = torch.zeros_like(p, dtype=torch.float32)
        else:
            for stat in STATS:
                state[stat] = self._zeros_without(p, _removed(stat, *dims))
        if group["beta1"] > 0:
            state["m"] = torch.zeros_like(p, dtype=self.momentum_dtype)
        return state

    @staticmethod
    def _zeros_without(p: torch.Tensor, removed: tuple[int, ...]) -> torch.Tensor:
        """Zeros shaped like ``p`` without the ``removed`` dims, placed like ``p`` along the rest."""
        keep = [d for d in range(p.ndim) if d not in removed]
        if not isinstance(p, DTensor):
            return torch.zeros([p.shape[d] for d in keep], dtype=torch.float32, device=p.device)
        local = p.to_local()
        shape = tuple(p.shape[d] for d in keep)
        placements = [_reduced_placement(pl, removed) for pl in p.placements]
        return DTensor.from_local(torch.zeros([local.shape[d] for d in keep], dtype=torch.float32, device=local.device),
                                  p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    # --- step ----------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Three passes over the parameters, holding no full-size temporary across parameters:
        (1) local sums of G2 for the factored statistics (then one all-reduce per mesh dim),
        (2) the second-moment EMAs, (3) the update direction, clipping, momentum and the parameter
        update. With update clipping the direction is computed twice (once for its global RMS)."""
        assert closure is None, "closures are not supported"
        work = []  # (param, group, state, factored dims, fp32 local gradient)
        for p, group, state in params_to_step(self, self._init_state):
            work.append((p, group, state, factored_dims(tuple(p.shape), group["min_dim"]), _local(p.grad).float()))
        sums = self._reduced_sums(work)
        for (_, group, state, dims, g), stat_sums in zip(work, sums):
            beta2 = min(group["beta2_cap"], 1.0 - float(state["step"]) ** -group["decay_rate"])
            if dims is None:
                _local(state["v"]).mul_(beta2).add_(g * g + EPS, alpha=1.0 - beta2)
            for stat, total in stat_sums.items():
                _local(state[stat]).mul_(beta2).add_(total, alpha=1.0 - beta2)
        scales = self._clip_scales(work) if any(g["clip_threshold"] > 0 for g in self.param_groups) else None
        for i, (p, group, state, dims, g) in enumerate(work):
            u = _direction(state, dims, g)
            if scales is not None and group["clip_threshold"] > 0:
                u.div_(scales[i])
            if group["beta1"] > 0:
                m = _local(state["m"])
                if self.decay_in_momentum_dtype:  # JAX's promotion: bf16 state * weak float stays bf16
                    decayed = m.mul(torch.tensor(group["beta1"], dtype=m.dtype, device=m.device)).float()
                else:
                    decayed = m.float().mul_(group["beta1"])
                u = decayed.add_(u, alpha=1.0 - group["beta1"])
                m.copy_(u)  # stored rounded to the momentum dtype; the unrounded value is the update
            lr = group["lr"]
            wd = self.param_wd.get(p, group["weight_decay"])
            relative = lr / group["base_lr"] if group["base_lr"] else 0.0
            local = _local(p)
            if wd:
                local.mul_(1.0 - relative * wd)
            local.add_(u.to(local.dtype), alpha=-lr)

    def _reduced_sums(self, work: list[Any]) -> list[dict[str, torch.Tensor]]:
        """Per factored parameter, its three statistics of this step's G2 as global means: local sums
        over the averaged dims, all-reduced (one flat buffer per process group, groups in a fixed
        order) over the mesh dims that split those dims, divided by the global sizes."""
        out: list[dict[str, torch.Tensor]] = []
        by_group: dict[Any, list[torch.Tensor]] = {}
        for p, _, _, dims, g in work:
            stats: dict[str, torch.Tensor] = {}
            if dims is not None:
                g2 = g * g + EPS  # one parameter's G2 at a time
                for stat in STATS:
                    removed = _removed(stat, *dims)
                    stats[stat] = g2.sum(dim=removed)
                    for group in _splitting_groups(p, removed):
                        by_group.setdefault(group, []).append(stats[stat])
            out.append(stats)
        for group in sorted(by_group, key=_group_key):
            _flat_collective(by_group[group], "allreduce", group[1])
        for (p, _, _, dims, _), stats in zip(work, out):
            for stat, t in stats.items():
                t.div_(math.prod(p.shape[d] for d in _removed(stat, *dims)))
        return out

    def _clip_scales(self, work: list[Any]) -> list[torch.Tensor]:
        """Per parameter, max(1, RMS(u) / threshold) with the RMS over the whole (global) tensor."""
        sq = [_direction(state, dims, g).pow(2).sum().reshape(1) for _, _, state, dims, g in work]
        by_group: dict[Any, list[torch.Tensor]] = {}
        for (p, *_rest), s in zip(work, sq):
            for group in _splitting_groups(p, tuple(range(p.ndim))):
                by_group.setdefault(group, []).append(s)
        for group in sorted(by_group, key=_group_key):
            _flat_collective(by_group[group], "allreduce", group[1])
        return [torch.clamp((s / p.numel()).sqrt() / max(group["clip_threshold"], 1e-30), min=1.0)
                for (p, group, *_rest), s in zip(work, sq)]


def _direction(state: dict[str, Any], dims: tuple[int, int] | None, g: torch.Tensor) -> torch.Tensor:
    """u = g / sqrt(V) from the (updated) second-moment state; V factored or elementwise."""
    if dims is None:
        return g * _local(state["v"]).rsqrt()
    d0, d1 = dims
    row, col, norm = (_local(state[s]) for s in STATS)
    reduced_d1 = d1 - 1 if d1 > d0 else d1
    row_factor = (row / norm.unsqueeze(reduced_d1)).rsqrt()
    return g * row_factor.unsqueeze(d0) * col.rsqrt().unsqueeze(d1)


def _splitting_groups(p: torch.Tensor, dims: tuple[int, ...]) -> list[tuple[str, Any]]:
    """(mesh dim name, process group) of the mesh dims that shard any of ``dims`` of ``p`` (none for
    plain tensors). The name orders the all-reduces the same way on every rank."""
    if not isinstance(p, DTensor):
        return []
    mesh = p.device_mesh
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    return [(names[i], mesh.get_group(i)) for i, pl in enumerate(p.placements) if _sharded_dim(pl) in dims]


def _group_key(key: tuple[str, Any]) -> tuple[str, tuple[int, ...]]:
    return key[0], tuple(dist.get_process_group_ranks(key[1]))
