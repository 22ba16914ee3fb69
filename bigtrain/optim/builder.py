"""Parameter groups (decay / no-decay / head) and optimizer construction."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from bigtrain.config import ConfigError
from bigtrain.config.schema import OptimConfig, parse_wd_mults
from bigtrain.distributed.activation import clean_name


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """The model's own list (``model.no_weight_decay()``) or, by default, every parameter with fewer
    than two dimensions (norms and biases)."""
    own = getattr(model, "no_weight_decay", None)
    return set(own()) if callable(own) else {n for n, p in model.named_parameters() if p.ndim < 2}


def head_param_names(model: nn.Module) -> set[str]:
    """Parameters of the classifier head (decoupled head weight decay, LR multiplier); none by default."""
    own = getattr(model, "head_param_names", None)
    return set(own()) if callable(own) else set()


def param_groups(
    model: nn.Module,
    weight_decay: float,
    head_weight_decay: float,
    head_lr_mult: float,
    no_decay_names: set[str] | None = None,
    head_names: set[str] | None = None,
) -> list[dict[str, Any]]:
    """Split trainable parameters into body-decay, no-decay and head groups.

    The model names its exempt parameters (``no_weight_decay()``: norms, biases,
    position embeddings, tokens; default: parameters with < 2 dims) and its classifier
    (``head_param_names()``; default: none),
    which gets its own decoupled weight decay and LR multiplier, as in
    "Scaling Vision Transformers". A pipeline stage is only part of a model,
    so the name sets can be given from the full model instead. Group order is
    fixed, so optimizer checkpoints line up between runs.
    """
    no_wd = no_decay_names if no_decay_names is not None else no_weight_decay_names(model)
    head = head_names if head_names is not None else head_param_names(model)
    no_wd, head = {clean_name(n) for n in no_wd}, {clean_name(n) for n in head}
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "names": [], "weight_decay": weight_decay, "lr_mult": 1.0},
        "no_decay": {"params": [], "names": [], "weight_decay": 0.0, "lr_mult": 1.0},
        "head_decay": {"params": [], "names": [], "weight_decay": head_weight_decay, "lr_mult": head_lr_mult},
        "head_no_decay": {"params": [], "names": [], "weight_decay": 0.0, "lr_mult": head_lr_mult},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = clean_name(name)
        key = ("head_" if name in head else "") + ("no_decay" if name in no_wd else "decay")
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    return [dict(g, group=k) for k, g in groups.items() if g["params"]]


def _implementation(model: nn.Module) -> dict[str, bool]:
    """CUDA: the fused kernel for plain tensors (one launch for all parameters); DTensor shards keep
    torch's default (foreach on CUDA). CPU: torch's default."""
    params = [p for p in model.parameters() if p.requires_grad]
    if params and all(p.is_cuda and not isinstance(p, DTensor) for p in params):
        return {"fused": True}
    return {}


@dataclass(frozen=True)
class OptimizerSpec:
    """An optimizer bigtrain can build, and the sharding it is correct under.

    ``build(groups, cfg, model)`` gets the parameter groups (each with ``weight_decay`` and
    ``lr_mult``), the ``optim.*`` section and the (parallelized) model. The capabilities say
    which layouts keep its update identical to one process:

    * ``dtensor``: it steps DTensor parameters (FSDP2 shards for ZeRO-2/3, TP shards);
    * ``zero1``: its state is per parameter, so bigtrain's ZeRO-1 (each dp rank steps the
      parameters it owns, then broadcasts them) changes nothing;
    * ``tp``: its update is elementwise, so a TP shard's update equals that slice of the
      full update (a factored or matrix-wise optimizer needs the whole matrix: no TP).

    ``state_bytes(global_shape, local_shape, cfg)``: bytes of state it keeps for one parameter's local
    shard (the memory estimator's optimizer row).
    """

    name: str
    build: Callable[[list[dict[str, Any]], OptimConfig, nn.Module], torch.optim.Optimizer]
    dtensor: bool = True
    zero1: bool = True
    tp: bool = True
    doc: str = ""
    state_bytes: Callable[[tuple[int, ...], tuple[int, ...], OptimConfig], int] = lambda g, local, cfg: 8 * math.prod(local)


OPTIMIZERS: dict[str, OptimizerSpec] = {}


def register_optimizer(spec: OptimizerSpec) -> OptimizerSpec:
    """Add (or replace) an optimizer under ``spec.name`` (``optim.name`` selects it)."""
    OPTIMIZERS[spec.name] = spec
    return spec


def get_optimizer(name: str) -> OptimizerSpec:
    spec = OPTIMIZERS.get(name)
    if spec is None:
        raise ConfigError(f"config key 'optim.name': unknown optimizer {name!r} (registered: {', '.join(sorted(OPTIMIZERS))})")
    return spec


def check_optimizer(name: str, tp: int, zero: int, dp: int) -> None:
    """Refuse, before any work, a layout the optimizer is not correct under (names the keys)."""
    spec = get_optimizer(name)
    if tp > 1 and not spec.tp:
        raise ConfigError(f"optim.name={name} needs whole weight matrices: it does not work with parallel.tp={tp}")
    if zero >= 2 and not spec.dtensor:
        raise ConfigError(f"optim.name={name} cannot step sharded (DTensor) parameters: it does not work with "
                          f"parallel.zero={zero}; use parallel.zero=0 or 1")
    if zero == 1 and dp > 1 and not spec.zero1:
        raise ConfigError(f"optim.name={name} does not support parallel.zero=1 partitioning; use parallel.zero=0")


register_optimizer(OptimizerSpec(
    "adamw",
    lambda groups, cfg, model: torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                                 **_implementation(model)),
    doc="AdamW (decoupled weight decay); elementwise, so every layout is exact.",
))
register_optimizer(OptimizerSpec(
    "sgd", lambda groups, cfg, model: torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.beta1),
    doc="SGD with momentum optim.beta1; elementwise.",
    state_bytes=lambda g, local, cfg: 4 * math.prod(local) if cfg.beta1 else 0,
))


def _build_factored(groups: list[dict[str, Any]], cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    from bigtrain.optim.factored import Factored

    for g in groups:
        g["base_lr"] = cfg.lr * g.get("lr_mult", 1.0)  # s_t = lr_t / base_lr scales the absolute weight decay
    opt = Factored(groups, lr=cfg.lr, beta1=cfg.beta1, min_dim_size_to_factor=cfg.min_dim_size_to_factor,
                   decay_rate=cfg.beta2_decay_rate, beta2_cap=cfg.beta2_cap, clip_threshold=cfg.update_clip,
                   momentum_dtype=getattr(torch, cfg.momentum_dtype),
                   decay_in_momentum_dtype=cfg.momentum_decay == "momentum_dtype")
    if cfg.wd_mults:
        rules = parse_wd_mults(cfg.wd_mults)
        for g in groups:
            for name, p in zip(g["names"], g["params"]):
                opt.param_wd[p] = cfg.weight_decay * next((m for rx, m in rules if rx.fullmatch(name)), 0.0)
    return opt


register_optimizer(OptimizerSpec(
    "factored", _build_factored,
    doc="big_vision's scale_by_adafactor (ViT-G): factored second moment, bf16 momentum, absolute weight decay; "
        "works on FSDP2/TP DTensor shards (statistics all-reduced over the mesh dims that split them).",
    state_bytes=lambda g, local, cfg: _factored_state_bytes(g, local, cfg),
))


register_optimizer(OptimizerSpec(
    "adamw8bit",
    lambda groups, cfg, model: _adamw8bit()(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps),
    doc="AdamW with 8-bit blockwise-quantized m and v (block 256, 2.03 B/param; tensors with < 2 dims or "
        "< 4096 elements keep fp32 state); blocks are aligned to the global tensor, so DCP reshards it.",
    state_bytes=lambda g, local, cfg: _adamw8bit_state_bytes(g, local),
))


def _factored_state_bytes(shape: tuple[int, ...], local: tuple[int, ...], cfg: OptimConfig) -> int:
    from bigtrain.optim.factored import factored_dims

    n = math.prod(local)
    momentum = n * (2 if cfg.momentum_dtype == "bfloat16" else 4) if cfg.beta1 > 0 else 0
    dims = factored_dims(shape, cfg.min_dim_size_to_factor)
    if dims is None:
        return momentum + 4 * n
    d0, d1 = dims
    if n == 0:
        return momentum
    return momentum + 4 * (n // local[d0] + n // local[d1] + n // (local[d0] * local[d1]))


def _adamw8bit_state_bytes(shape: tuple[int, ...], local: tuple[int, ...]) -> int:
    from bigtrain.optim.adamw8bit import BLOCK, is_quantized

    n = math.prod(local)
    if not is_quantized(shape):
        return 8 * n
    rows = n // local[-1] if local[-1] else 0
    return 2 * n + 2 * 4 * rows * -(-shape[-1] // BLOCK)


def _adamw8bit() -> type[torch.optim.Optimizer]:
    from bigtrain.optim.adamw8bit import AdamW8bit

    return AdamW8bit


def build_optimizer(
    model: nn.Module, cfg: OptimConfig, no_decay_names: set[str] | None = None, head_names: set[str] | None = None
) -> torch.optim.Optimizer:
    head_wd = cfg.weight_decay if cfg.head_weight_decay < 0 else cfg.head_weight_decay
    groups = param_groups(model, cfg.weight_decay, head_wd, cfg.head_lr_mult, no_decay_names, head_names)
    return get_optimizer(cfg.name).build(groups, cfg, model)
