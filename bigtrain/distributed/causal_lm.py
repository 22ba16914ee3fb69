"""Parallelize the causal LM: tensor/sequence parallel, activation checkpointing, FSDP — in that order."""

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
from bigtrain.models.causal_lm import CausalLM


def check_lm_layout(model: CausalLM, ps: ParallelState, seq_len: int, sequence_parallel: bool) -> None:
    c = model.config
    if ps.tp > 1:
        for name, size in (("model.num_heads", c.num_attention_heads), ("model.num_kv_heads", c.num_key_value_heads),
                           ("model.mlp_dim", c.intermediate_size)):
            if size % ps.tp:
                raise ConfigError(f"config key '{name}' ({size}) is not divisible by parallel.tp={ps.tp}")
        if sequence_parallel and seq_len % ps.tp:
            raise ConfigError(f"sequence parallel needs model.seq_len ({seq_len}) divisible by parallel.tp={ps.tp}")


def apply_tp(model: CausalLM, ps: ParallelState, sequence_parallel: bool) -> None:
    """Megatron-style TP on HF Llama layers: q/k/v, gate/up column-sharded; o, down row-sharded.

    The LM head stays replicated, so logits are whole on every rank (no vocab-parallel
    loss, which does not compose with pipeline schedules).
    """
    mesh = ps.submesh("tp")
    seq = Shard(1) if sequence_parallel else Replicate()
    for layer in model.layers.values():
        plan = {
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": seq}, desired_input_kwarg_layouts={"hidden_states": Replicate()}
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=seq),
            "mlp": PrepareModuleInput(input_layouts=(seq,), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=seq),
        }
        if sequence_parallel:
            plan.update({"input_layernorm": SequenceParallel(), "post_attention_layernorm": SequenceParallel()})
        parallelize_module(layer, mesh, plan)
    if not sequence_parallel:
        return
    model.sequence_shards = ps.tp
    first = min(model.layers.keys(), key=int) if model.layers else None
    if model.embed_tokens is not None and first is not None:
        parallelize_module(
            model.layers[first], mesh,
            PrepareModuleInput(input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),), use_local_output=True),
        )
    if model.norm is not None:
        parallelize_module(model, mesh, {"norm": SequenceParallel()})
        parallelize_module(
            model.norm, mesh,
            PrepareModuleOutput(output_layouts=(Shard(1),), desired_output_layouts=(Replicate(),), use_local_output=True),
        )


def parallelize_lm(model: CausalLM, ps: ParallelState, cfg: ParallelConfig, seq_len: int, param_dtype: torch.dtype | None) -> CausalLM:
    sp = cfg.sequence_parallel and ps.tp > 1
    check_lm_layout(model, ps, seq_len, sp)
    if ps.tp > 1:
        apply_tp(model, ps, sp)
    apply_activation_checkpointing(model.layers, cfg.activation_checkpointing, cfg.ac_every)
    if cfg.zero >= 2 and ps.dp > 1:
        apply_fsdp(list(model.layers.values()), model, ps, cfg.zero, param_dtype)
    return model
