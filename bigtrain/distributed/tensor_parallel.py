"""Megatron-style tensor + sequence parallelism for pre-norm transformer blocks, and the
common parallelize order (TP/SP -> activation checkpointing -> FSDP) every model uses.

A model describes where its projections live (:class:`BlockPlan`); the rest is shared.
With sequence parallelism, tokens between blocks are sharded along the sequence
(norms run on local tokens); the first block slices the embedded tokens and the
final norm gathers them back for the replicated head. Blocks exchange plain local
tensors, so pipeline stages can pass them on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
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


@dataclass(frozen=True)
class BlockPlan:
    """Names inside one block (relative to the block)."""

    attn: str
    attn_in: tuple[str, ...]  # column-sharded: q, k, v (heads split across TP ranks)
    attn_out: str  # row-sharded output projection
    mlp: str
    mlp_in: tuple[str, ...]  # column-sharded
    mlp_out: str  # row-sharded
    norms: tuple[str, ...]  # sequence-parallel norms
    attn_input_kwarg: str | None = None  # set when the block calls attention with a keyword input


def apply_tp(
    model: nn.Module, blocks: nn.ModuleDict, ps: ParallelState, plan: BlockPlan, sequence_parallel: bool,
    has_embedding: bool, final_norm: str | None,
) -> None:
    mesh = ps.submesh("tp")
    seq = Shard(1) if sequence_parallel else Replicate()
    if plan.attn_input_kwarg:
        attn_prep = PrepareModuleInput(
            input_kwarg_layouts={plan.attn_input_kwarg: seq}, desired_input_kwarg_layouts={plan.attn_input_kwarg: Replicate()}
        )
    else:
        attn_prep = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
    for block in blocks.values():
        styles: dict[str, object] = {plan.attn: attn_prep, plan.attn_out: RowwiseParallel(output_layouts=seq)}
        styles.update({name: ColwiseParallel() for name in (*plan.attn_in, *plan.mlp_in)})
        styles[plan.mlp] = PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),))
        styles[plan.mlp_out] = RowwiseParallel(output_layouts=seq)
        if sequence_parallel:
            styles.update({name: SequenceParallel() for name in plan.norms})
        parallelize_module(block, mesh, styles)  # type: ignore[arg-type]
    if not sequence_parallel:
        return
    if has_embedding and len(blocks):  # first stage: full tokens -> local slice
        first = min(blocks.keys(), key=int)
        parallelize_module(
            blocks[first], mesh,
            PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True),
        )
    if final_norm is not None and getattr(model, final_norm) is not None:  # last stage: gather for the head
        parallelize_module(model, mesh, {final_norm: SequenceParallel()})
        parallelize_module(
            getattr(model, final_norm), mesh,
            PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True),
        )


def parallelize_transformer(
    model: nn.Module, blocks: nn.ModuleDict, ps: ParallelState, cfg: ParallelConfig, plan: BlockPlan | None,
    has_embedding: bool, final_norm: str | None, param_dtype: torch.dtype | None,
) -> nn.Module:
    """TP/SP, then activation checkpointing, then compile, then FSDP (ZeRO-2/3), on a model or a pipeline stage.
    ``plan`` None: the model has no tensor-parallel plan (``parallel.tp`` must be 1)."""
    if ps.tp > 1:
        if plan is None:
            raise ConfigError(f"{type(model).__name__} declares no tensor-parallel plan: parallel.tp must be 1 "
                              f"(got {ps.tp})")
        apply_tp(model, blocks, ps, plan, cfg.sequence_parallel, has_embedding, final_norm)
    apply_activation_checkpointing(blocks, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.compile:
        # Module.compile() compiles in place (no wrapper module), so parameter names and DCP
        # keys stay the same; compiling per block (not the whole model) keeps FSDP's per-block
        # hooks outside the graphs and lets identical blocks reuse one compiled graph.
        for block in blocks.values():
            block.compile()
    if ps.uses_fsdp(cfg.zero):
        apply_fsdp(list(blocks.values()), model, ps, cfg.zero, param_dtype)
    return model


def parallelize_blocks(model: nn.Module, ps: ParallelState, cfg: ParallelConfig, param_dtype: torch.dtype | None) -> nn.Module:
    """The parallelize of a family that declares none: no tensor parallelism; activation
    checkpointing, compile and FSDP units per entry of ``model.blocks`` (if the model has one)."""
    blocks = getattr(model, "blocks", None)
    blocks = blocks if isinstance(blocks, nn.ModuleDict) else nn.ModuleDict()
    return parallelize_transformer(model, blocks, ps, cfg, None, False, None, param_dtype)
