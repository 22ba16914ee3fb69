"""Parallelize the causal LM (HF Llama layers), or a pipeline stage of it.

The LM head stays replicated, so logits are whole on every rank (no vocab-parallel
loss, which does not compose with pipeline schedules).
"""

from __future__ import annotations

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.distributed.mesh import ParallelState
from bigtrain.distributed.tensor_parallel import BlockPlan, parallelize_transformer
from bigtrain.models.causal_lm import CausalLM

LLAMA_PLAN = BlockPlan(
    attn="self_attn", attn_in=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), attn_out="self_attn.o_proj",
    mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    norms=("input_layernorm", "post_attention_layernorm"), attn_input_kwarg="hidden_states",
)


def check_lm_layout(model: CausalLM, tp: int, seq_len: int, sequence_parallel: bool) -> None:
    c = model.config
    if tp > 1:
        for name, size in (("model.num_heads", c.num_attention_heads), ("model.num_kv_heads", c.num_key_value_heads),
                           ("model.mlp_dim", c.intermediate_size)):
            if size % tp:
                raise ConfigError(f"config key '{name}' ({size}) is not divisible by parallel.tp={tp}")
        if sequence_parallel and seq_len % tp:
            raise ConfigError(f"sequence parallel needs model.seq_len ({seq_len}) divisible by parallel.tp={tp}")


def check_layout(model: CausalLM, config: Config, tp: int) -> None:
    """The Family hook: what parallelize_lm refuses, without a process group (the estimate runs it)."""
    check_lm_layout(model, tp, config.model.seq_len, config.parallel.sequence_parallel and tp > 1)


def parallelize_lm(model: CausalLM, ps: ParallelState, config: Config, param_dtype: torch.dtype | None) -> CausalLM:
    cfg = config.parallel
    sp = cfg.sequence_parallel and ps.tp > 1
    check_lm_layout(model, ps.tp, config.model.seq_len, sp)
    if sp:
        model.sequence_shards = ps.tp  # rotary embeddings need the full length on later stages
    parallelize_transformer(model, model.layers, ps, cfg, LLAMA_PLAN, model.embed_tokens is not None, "norm", param_dtype)
    return model
