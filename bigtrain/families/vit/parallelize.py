"""Parallelize a ViT (or a pipeline stage of one)."""

from __future__ import annotations

import torch

from bigtrain.config import Config, ConfigError
from bigtrain.distributed.mesh import ParallelState
from bigtrain.distributed.tensor_parallel import BlockPlan, parallelize_transformer
from bigtrain.models.vit import ViT

VIT_PLAN = BlockPlan(
    attn="attn", attn_in=("attn.q", "attn.k", "attn.v"), attn_out="attn.proj",
    mlp="mlp", mlp_in=("mlp.fc1",), mlp_out="mlp.fc2", norms=("norm1", "norm2"),
)


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


def parallelize_vit(model: ViT, ps: ParallelState, cfg: Config, param_dtype: torch.dtype | None) -> ViT:
    check_vit_layout(model, ps, cfg.parallel.sequence_parallel and ps.tp > 1)
    parallelize_transformer(model, model.blocks, ps, cfg.parallel, VIT_PLAN, model.patch_embed is not None, "norm",
                            param_dtype)
    return model
