"""AdamW with 8-bit, blockwise-quantized moments ("8-bit Optimizers via Block-wise Quantization",
Dettmers et al.), on whole or sharded (DTensor) parameters, in a layout-independent state.

The update is AdamW's (torch's and bitsandbytes' form): m and v are EMAs of g and g^2,
p <- p * (1 - lr * wd) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps), computed in fp32.
Between steps m and v are stored as uint8 codes into a 256-entry dynamic (exponent + linear
fraction) map — signed for m, unsigned for v — times one fp32 absmax per block of 256: 2 + 8/256 =
2.03 bytes per parameter instead of 8.

Why not bitsandbytes or torchao (docs/training.md, "Optimizers and schedules"): both key their decisions and blocks to the
*local* tensor. bitsandbytes keeps plain per-rank state, which DCP deduplicates across ranks (bnb#89,
#1633), and applies its 4096-element threshold to the local shard (#2080); torchao quantizes a shard
only when its local size divides by the block and reshards only at block-aligned dim-0 slices, so a
checkpoint does not load at another world size (ao#4912). Here:

* which tensors are quantized is decided on the *global* shape: >= 2 dims and >= 4096 elements
  (biases, norms and small tensors keep fp32 m and v);
* blocks are runs of 256 along the *last* dim of the global tensor, one row of blocks per index of
  the leading dims: any FSDP (dim 0) or TP colwise shard boundary is a block boundary. When a mesh
  dim splits the last dim (TP rowwise), a block may straddle ranks: each rank computes the absmax of
  its part, and one MAX all-reduce per mesh dim per step (all such parameters in one flat buffer)
  makes it the block's global absmax — the codes then equal one process's;
* codes are DTensors with the parameter's placements and absmax DTensors of shape
  (leading dims..., blocks) placed like the parameter on the leading dims and replicated over mesh
  dims that split the last one, so DCP reshards both to any layout (elastic resume).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.distributed.tensor.placement_types import Placement, _StridedShard

from bigtrain.distributed.data_parallel import _flat_collective, _local
from bigtrain.optim.state import KeepStateDtypes, params_to_step
from bigtrain.optim.factored import _contiguous_stride, _group_key, _sharded_dim

BLOCK = 256
MIN_QUANTIZED_NUMEL = 4096
QUANTIZED = ("m_codes", "m_absmax", "v_codes", "v_absmax")


def dynamic_map(signed: bool) -> torch.Tensor:
    """The 256 sorted values of the dynamic quantization map: magnitudes 10^-6 ... 1 in 7 decades,
    decade k (0 = smallest) holding 2^k (signed) or 2^(k+1) (unsigned) linearly spaced fractions
    in (0.1, 1) — fine steps near the block's absmax, coarse ones far below it — plus 0 and 1.
    Signed: 127 positive, 127 negative, 0, 1; unsigned: 254 positive, 0, 1."""
    values = [0.0, 1.0]
    for k in range(7):
        n = 2**k if signed else 2 ** (k + 1)
        edges = torch.linspace(0.1, 1.0, n + 1, dtype=torch.float64)
        mids = ((edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)).tolist()
        values += mids + ([-x for x in mids] if signed else [])
    out = torch.tensor(sorted(values), dtype=torch.float32)
    assert out.numel() == 256
    return out


_MAPS = {signed: dynamic_map(signed) for signed in (True, False)}
# nearest-value rounding: the code of x is the number of midpoints below it
_MIDPOINTS = {signed: (m[1:] + m[:-1]) / 2 for signed, m in _MAPS.items()}


def is_quantized(shape: tuple[int, ...]) -> bool:
    """The global-shape rule: the same answer on every rank and under every layout."""
    numel = 1
    for s in shape:
        numel *= s
    return len(shape) >= 2 and numel >= MIN_QUANTIZED_NUMEL


def _absmax_placement(pl: Placement, last: int) -> Placement:
    dim = _sharded_dim(pl)
    return Replicate() if dim == last else pl


def _last_dim_span(p: torch.Tensor) -> tuple[int, int]:
    """(global offset, local size) of this rank's part of the last dim."""
    if not isinstance(p, DTensor):
        return 0, p.shape[-1]
    last = p.ndim - 1
    for pl in p.placements:
        if isinstance(pl, _StridedShard) and pl.dim == last:
            raise NotImplementedError("adamw8bit: a strided shard of the last dim (FSDP over TP on it) is not supported")
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return offset[last], shape[last]


def _last_dim_groups(p: torch.Tensor) -> list[tuple[str, Any]]:
    if not isinstance(p, DTensor):
        return []
    mesh, last = p.device_mesh, p.ndim - 1
    names = mesh.mesh_dim_names or tuple(str(i) for i in range(mesh.ndim))
    return [(names[i], mesh.get_group(i)) for i, pl in enumerate(p.placements) if _sharded_dim(pl) == last]


class _Blocks:
    """Where this rank's columns sit in the global block grid of one parameter."""

    def __init__(self, p: torch.Tensor) -> None:
        self.offset, self.width = _last_dim_span(p)
        self.nblocks = -(-p.shape[-1] // BLOCK)  # global blocks per row
        self.first = self.offset // BLOCK
        self.pad_left = self.offset - self.first * BLOCK
        self.local_blocks = -(-(self.pad_left + self.width) // BLOCK) if self.width else 0
        self.groups = _last_dim_groups(p)

    def absmax(self, x: torch.Tensor) -> torch.Tensor:
        """Per block of the global grid, the absmax of this rank's elements in it (zeros for blocks
        it has none of): shape (local leading dims..., global blocks)."""
        out = torch.zeros((*x.shape[:-1], self.nblocks), dtype=torch.float32, device=x.device)
        if self.width == 0 or x.numel() == 0:
            return out
        right = self.local_blocks * BLOCK - self.pad_left - self.width
        padded = torch.nn.functional.pad(x.abs(), (self.pad_left, right))
        out[..., self.first : self.first + self.local_blocks] = padded.view(*x.shape[:-1], self.local_blocks, BLOCK).amax(-1)
        return out

    def per_element(self, absmax: torch.Tensor) -> torch.Tensor:
        mine = absmax[..., self.first : self.first + self.local_blocks]
        return mine.repeat_interleave(BLOCK, dim=-1)[..., self.pad_left : self.pad_left + self.width]


def quantize(x: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """uint8 codes of ``x / scale`` (``scale``: per-element absmax; 0 where the block is all zeros)."""
    normalized = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.bucketize(normalized, _MIDPOINTS[signed].to(x.device), out_int32=True).to(torch.uint8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    values = _MAPS[signed].to(codes.device).index_select(0, codes.reshape(-1).int()).view(codes.shape)
    return values * scale


class AdamW8bit(KeepStateDtypes, torch.optim.Optimizer):
    """See the module docstring. Groups carry ``lr``, ``betas``, ``eps`` and ``weight_decay``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self._blocks: dict[torch.Tensor, _Blocks] = {}

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        state: dict[str, Any] = {"step": torch.zeros((), dtype=torch.float32)}
        if not is_quantized(tuple(p.shape)):
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            return state
        for name in ("m", "v"):
            state[f"{name}_codes"] = torch.zeros_like(p, dtype=torch.uint8)
            state[f"{name}_absmax"] = self._absmax_zeros(p)
        return state

    def _absmax_zeros(self, p: torch.Tensor) -> torch.Tensor:
        nblocks = -(-p.shape[-1] // BLOCK)
        if not isinstance(p, DTensor):
            return torch.zeros((*p.shape[:-1], nblocks), dtype=torch.float32, device=p.device)
        local = p.to_local()
        shape = (*p.shape[:-1], nblocks)
        placements = [_absmax_placement(pl, p.ndim - 1) for pl in p.placements]
        return DTensor.from_local(torch.zeros((*local.shape[:-1], nblocks), dtype=torch.float32, device=local.device),
                                  p.device_mesh, placements, run_check=False, shape=torch.Size(shape),
                                  stride=_contiguous_stride(shape))

    def blocks(self, p: torch.Tensor) -> _Blocks:
        if p not in self._blocks:
            self._blocks[p] = _Blocks(p)
        return self._blocks[p]

    @staticmethod
    def _moments(state: dict[str, Any], g: torch.Tensor, blocks: _Blocks | None,
                 betas: tuple[float, float]) -> tuple[torch.Tensor, torch.Tensor]:
        """This step's fp32 m and v (the stored state is not changed)."""
        if blocks is None:
            m, v = _local(state["exp_avg"]).clone(), _local(state["exp_avg_sq"]).clone()
        else:
            m = dequantize(_local(state["m_codes"]), blocks.per_element(_local(state["m_absmax"])), signed=True)
            v = dequantize(_local(state["v_codes"]), blocks.per_element(_local(state["v_absmax"])), signed=False)
        m.lerp_(g, 1.0 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1.0 - betas[1])
        return m, v

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """Parameters whose last dim is not split by a mesh dim are finished one at a time (no
        communication). The others need their blocks' global absmax first: their moments are computed
        once for the block maxima (one MAX all-reduce per mesh dim for all of them), then again,
        identically, for the update — so no full-size fp32 temporary is held across parameters."""
        assert closure is None, "closures are not supported"
        deferred = []
        for p, group, state in params_to_step(self, lambda p, _group: self._init_state(p)):
            blocks = self.blocks(p) if "m_codes" in state else None
            if blocks is not None and blocks.groups:
                deferred.append((p, group, state, blocks))
            else:
                self._update(p, group, state, blocks, None)
        if not deferred:
            return
        partial: list[tuple[torch.Tensor, torch.Tensor]] = []
        by_group: dict[Any, list[torch.Tensor]] = {}
        for p, group, state, blocks in deferred:
            m, v = self._moments(state, _local(p.grad).float(), blocks, group["betas"])
            maxima = (blocks.absmax(m), blocks.absmax(v))
            partial.append(maxima)
            for key in blocks.groups:
                by_group.setdefault(key, []).extend(maxima)
        for key in sorted(by_group, key=_group_key):
            _flat_collective(by_group[key], "allreduce", key[1], reduce_op=dist.ReduceOp.MAX)
        for (p, group, state, blocks), maxima in zip(deferred, partial):
            self._update(p, group, state, blocks, maxima)

    def _update(self, p: torch.Tensor, group: dict[str, Any], state: dict[str, Any], blocks: _Blocks | None,
                maxima: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        beta1, beta2 = group["betas"]
        m, v = self._moments(state, _local(p.grad).float(), blocks, group["betas"])
        t = float(state["step"])
        local = _local(p)
        lr, wd = group["lr"], group["weight_decay"]
        if wd:
            local.mul_(1.0 - lr * wd)
        denom = (v / (1.0 - beta2**t)).sqrt_().add_(group["eps"])
        local.addcdiv_(m.to(local.dtype), denom.to(local.dtype), value=-lr / (1.0 - beta1**t))
        if blocks is None:
            _local(state["exp_avg"]).copy_(m)
            _local(state["exp_avg_sq"]).copy_(v)
            return
        if maxima is None:
            maxima = (blocks.absmax(m), blocks.absmax(v))
        for name, x, absmax, signed in (("m", m, maxima[0], True), ("v", v, maxima[1], False)):
            _local(state[f"{name}_absmax"]).copy_(absmax)
            _local(state[f"{name}_codes"]).copy_(quantize(x, blocks.per_element(absmax), signed))
