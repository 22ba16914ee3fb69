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


def check_vit_layout(model: ViT, tp: int, sequence_parallel: bool) -> None:
    a = model.args
    if tp > 1:
        for name, size in (("model.num_heads", a.num_heads), ("model.mlp_dim", a.mlp_dim)):
            if size % tp:
                raise ConfigError(f"config key '{name}' ({size}) is not divisible by parallel.tp={tp}")
        if sequence_parallel and a.seq_len % tp:
            raise ConfigError(
                f"sequence parallel needs the token count ({a.seq_len}) divisible by parallel.tp={tp}; "
                "set parallel.sequence_parallel=false or change image/patch size"
            )


def check_layout(model: ViT, cfg: Config, tp: int) -> None:
    """The Family hook: what parallelize_vit refuses, without a process group (the estimate runs it)."""
    check_vit_layout(model, tp, cfg.parallel.sequence_parallel and tp > 1)


def parallelize_vit(model: ViT, ps: ParallelState, cfg: Config, param_dtype: torch.dtype | None) -> ViT:
    check_layout(model, cfg, ps.tp)
    parallelize_transformer(model, model.blocks, ps, cfg.parallel, VIT_PLAN, model.patch_embed is not None, "norm",
                            param_dtype)
    return model
