"""Parallelize a DiT: Megatron tensor parallelism inside each block (q/k/v and fc1 column-, proj
and fc2 row-parallel, whole heads per rank), then activation checkpointing, compile and FSDP units
per block.

The adaLN modulation, the embedders and the final layer stay replicated: they act on one
conditioning vector per sample, not per token, so they are cheap. Sequence parallelism is refused:
with tokens sharded between blocks, each rank's gradient of the (replicated) modulation would miss
the other ranks' tokens.
"""

from __future__ import annotations

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.distributed.mesh import ParallelState
from bigtrain.distributed.tensor_parallel import BlockPlan, parallelize_transformer
from bigtrain.models.dit import DiT

DIT_PLAN = BlockPlan(attn="attn", attn_in=("attn.q", "attn.k", "attn.v"), attn_out="attn.proj", mlp="mlp",
                     mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", norms=())


def check_layout(model: DiT, cfg: Config, tp: int) -> None:
    """The Family hook: what parallelize_dit refuses, without a process group (the estimate runs it)."""
    if tp > 1:
        a = model.args
        for name, size in (("model.num_heads", a.num_heads), ("model.width * model.mlp_ratio", int(a.width * a.mlp_ratio))):
            if size % tp:
                raise ConfigError(f"config key '{name}' ({size}) is not divisible by parallel.tp={tp}")
        if cfg.parallel.sequence_parallel:
            raise ConfigError("model.family=dit does not support sequence parallelism (its per-sample adaLN modulation "
                              "would need its gradients summed over the token shards): set parallel.sequence_parallel=false")


def parallelize_dit(model: DiT, ps: ParallelState, cfg: Config, param_dtype: torch.dtype | None) -> DiT:
    check_layout(model, cfg, ps.tp)
    parallelize_transformer(model, model.blocks, ps, cfg.parallel, DIT_PLAN, False, None, param_dtype)
    return model
