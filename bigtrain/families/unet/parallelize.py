"""Parallelize a text-conditioned UNet: activation checkpointing, compile and FSDP units per ResNet
block, transformer block and text-encoder layer (diffusers' own ``_no_split_modules`` granularity),
the rest (convolutions in/out, time embedding, up/down samplers, skip gates) in the root unit.

No tensor parallelism (convolutions and GroupNorm have no Megatron plan here: parallel.tp must be
1) and no pipeline stages (every up block reads skips from the down path). Units stay where
diffusers put them, so parameter names and checkpoint keys are diffusers' own.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

from bigtrain.config import Config, ConfigError
from bigtrain.distributed.data_parallel import apply_fsdp
from bigtrain.distributed.mesh import ParallelState

UNIT_TYPES = ("ResnetBlock2D", "BasicTransformerBlock", "CLIPEncoderLayer")


def units(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, unit) of every FSDP / checkpointing unit, in module order."""
    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child).__name__ in UNIT_TYPES:
                found.append((parent, name, child))
    return found


def check_layout(model: nn.Module, cfg: Config, tp: int) -> None:
    """The Family hook: what parallelize_unet refuses, without a process group (the estimate runs it)."""
    if tp > 1:
        raise ConfigError(f"model.family=unet has no tensor-parallel plan: parallel.tp must be 1 (got {tp})")


def parallelize_unet(model: nn.Module, ps: ParallelState, cfg: Config, param_dtype: torch.dtype | None) -> nn.Module:
    p = cfg.parallel
    check_layout(model, cfg, ps.tp)
    found = units(model)
    if p.activation_checkpointing != "none":
        for k, (parent, name, child) in enumerate(found):
            if p.activation_checkpointing == "full" or k % p.ac_every == p.ac_every - 1:
                parent._modules[name] = checkpoint_wrapper(child, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
        found = [(parent, name, parent._modules[name]) for parent, name, _ in found]
    if p.compile:
        for _, _, unit in found:
            unit.compile()
    if ps.uses_fsdp(p.zero):
        apply_fsdp([unit for _, _, unit in found], model, ps, p.zero, param_dtype)
    return model
