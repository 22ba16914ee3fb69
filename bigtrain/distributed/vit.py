"""Parallelize a ViT: tensor/sequence parallel, activation checkpointing, FSDP — in that order."""

from __future__ import annotations

import torch
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    PrepareModuleOutput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from bigtrain.config import ConfigError
from bigtrain.config.schema import ParallelConfig
from bigtrain.distributed.activation import apply_activation_checkpointing
from bigtrain.distributed.data_parallel import apply_fsdp
from bigtrain.distributed.mesh import ParallelState
from bigtrain.models.vit import ViT


def check_vit_layout(model: ViT, ps: ParallelState, sequence_parallel: bool) -> None:
    a = model.args
    if ps.tp > 1:
        for name, size in (("model.num_heads", a.num_heads), ("model.mlp_dim", a.mlp_dim)):
            if size % ps.tp:
                raise ConfigError(f"config key '{name}' ({size}) is not divisible by parallel.tp={ps.tp}")
        if sequence_parallel and a.seq_len % ps.tp:
            raise ConfigError(
                f"sequence parallel needs the token count ({a.seq_len}) divisible by parallel.tp={ps.tp}; "
                "set parallel.sequence_parallel=false or change image/patch size"
            )


def apply_tp(model: ViT, ps: ParallelState, sequence_parallel: bool) -> None:
    """Megatron-style TP: q/k/v and fc1 column-sharded (heads split), proj and fc2 row-sharded.

    With sequence parallelism, tokens between blocks are sharded along the
    sequence (norms run on local tokens); the first block slices the embedded
    tokens and the final norm gathers them back for the (replicated) head.
    Blocks exchange plain local tensors, so pipeline stages can pass them on.
    """
    mesh = ps.submesh("tp")
    seq = Shard(1) if sequence_parallel else Replicate()
    for name, block in model.blocks.items():
        plan = {
            "attn": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "attn.q": ColwiseParallel(),
            "attn.k": ColwiseParallel(),
            "attn.v": ColwiseParallel(),
            "attn.proj": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.fc1": ColwiseParallel(),
            "mlp.fc2": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan.update({"norm1": SequenceParallel(), "norm2": SequenceParallel()})
        parallelize_module(block, mesh, plan)
    if not sequence_parallel:
        return
    if model.patch_embed is not None and "0" in model.blocks:  # first stage: full tokens -> local slice
        parallelize_module(
            model.blocks["0"], mesh,
            PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True),
        )
    if model.norm is not None:  # last stage: norm on local tokens, then gather for pooling
        parallelize_module(model, mesh, {
            "norm": SequenceParallel(),
        })
        parallelize_module(
            model.norm, mesh,
            PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True),
        )


def parallelize_vit(model: ViT, ps: ParallelState, cfg: ParallelConfig, param_dtype: torch.dtype | None) -> ViT:
    """Apply TP/SP, then activation checkpointing, then FSDP (ZeRO-2/3) to a model or a pipeline stage."""
    sp = cfg.sequence_parallel and ps.tp > 1
    check_vit_layout(model, ps, sp)
    if ps.tp > 1:
        apply_tp(model, ps, sp)
    apply_activation_checkpointing(model.blocks, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.zero >= 2 and ps.dp > 1:
        apply_fsdp(list(model.blocks.values()), model, ps, cfg.zero, param_dtype)
    return model
