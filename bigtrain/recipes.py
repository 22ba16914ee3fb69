"""Turn a validated :class:`Config` into the pieces the trainer runs.

This is the only place that knows which model, task, data and evaluator a
config means; the trainer itself never branches on the task type.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from bigtrain.config.batching import plan_batches
from bigtrain.checkpoint import Checkpointer
from bigtrain.components import EMA
from bigtrain.distributed import LaunchEnv, ParallelState
from bigtrain.distributed.data_parallel import DataParallel
from bigtrain.distributed.pipeline import Pipeline, PipelineModel, merge_parts
from bigtrain.distributed.causal_lm import parallelize_lm
from bigtrain.distributed.vit import parallelize_vit
from bigtrain.config import Config, ConfigError, dump_yaml
from bigtrain.eval import ClassificationEvaluator
from bigtrain.eval.causal_lm import CausalLMEvaluator
from bigtrain.models.causal_lm import CausalLM, llama_config
from bigtrain.models.vit import ViT, ViTArgs
from bigtrain.optim import LRSchedule, ScheduleSpec, build_optimizer, check_optimizer
from bigtrain.tasks import CausalLMTask, ClassificationTask
from bigtrain.trainer import Trainer
from data_pipeline import DataError, GlobalOrder, ImageBatchDataset, ImageSpec, SplitInfo, TrainStream, load_split
from data_pipeline.index import check_shards, find_foreign_shards, read_index
from data_pipeline.loader import ShardBatchDataset, TokenBatchDataset
from data_pipeline.text import write_text_shards
from data_pipeline.writer import write_digits, write_set_atomically

log = logging.getLogger(__name__)


def ensure_data(cfg: Config) -> None:
    """Write the embedded data set into ``data.dir`` if it holds no shards for the train split.

    The set is written into a temporary directory and renamed into place when complete, and
    only where ``data.dir`` does not exist or is empty: a directory of the user's that is not a
    shard set is never written into."""
    d = cfg.data
    have_index = os.path.isdir(d.dir) and (read_index(d.dir) or {}).get("splits", {}).get(d.train_split)
    if have_index or (os.path.isdir(d.dir) and find_foreign_shards(d.dir, d.train_split)):
        return
    if d.source == "none":
        raise DataError(f"data.dir={d.dir!r} has no shards for split '{d.train_split}' and data.source=none")
    if os.path.exists(d.dir) and (not os.path.isdir(d.dir) or os.listdir(d.dir)):
        raise DataError(
            f"data.dir={d.dir!r} is not empty and holds no shards for split '{d.train_split}': refusing to write "
            f"data.source={d.source} into it (point data.dir at a new or empty directory, or set data.source=none)")
    if d.source == "stdlib_text":
        log.info("writing byte-level token shards of the Python standard library into %s", d.dir)
        write_set_atomically(d.dir, lambda tmp: write_text_shards(
            tmp, seq_len=cfg.model.seq_len, max_bytes=d.text_max_bytes, samples_per_shard=d.samples_per_shard))
        return
    log.info("writing the embedded digits data set into %s", d.dir)
    write_set_atomically(d.dir, lambda tmp: write_digits(tmp, image_size=d.image_size,
                                                         samples_per_shard=d.samples_per_shard, seed=0))


def image_spec(cfg: Config, train: bool) -> ImageSpec:
    d = cfg.data
    return ImageSpec(
        image_size=d.image_size, channels=d.channels, num_classes=cfg.model.num_classes, mean=list(d.mean),
        std=list(d.std), augment=d.augment if train else "none", crop_padding=d.crop_padding, on_error=d.on_error,
        max_member_bytes=d.max_member_bytes,
    )


def vit_args(cfg: Config) -> ViTArgs:
    m = cfg.model
    try:
        return ViTArgs.from_variant(
            m.variant, width=m.width, depth=m.depth, mlp_dim=m.mlp_dim, num_heads=m.num_heads,
            patch_size=m.patch_size, image_size=m.image_size, in_channels=m.in_channels, num_classes=m.num_classes,
            head=m.head, posemb=m.posemb, dropout=m.dropout, head_zero_init=m.head_zero_init,
        )
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def build_model(cfg: Config) -> nn.Module:
    torch.manual_seed(cfg.train.seed)  # init depends on the seed only, not on what ran before
    return ViT(vit_args(cfg)) if cfg.model.name == "vit" else CausalLM(lm_config(cfg))


def lm_config(cfg: Config) -> Any:
    m = cfg.model
    if not (m.width and m.depth and m.num_heads and m.mlp_dim):
        raise ConfigError("model.name=llama needs model.width, model.depth, model.num_heads and model.mlp_dim")
    return llama_config(m.vocab_size, m.width, m.depth, m.num_heads, m.num_kv_heads, m.mlp_dim, m.seq_len)


def parallelize(model: nn.Module, cfg: Config, ps: ParallelState, param_dtype: torch.dtype | None) -> nn.Module:
    if isinstance(model, ViT):
        return parallelize_vit(model, ps, cfg.parallel, param_dtype)
    return parallelize_lm(model, ps, cfg.parallel, cfg.model.seq_len, param_dtype)


def make_task(cfg: Config, model: nn.Module) -> nn.Module:
    return ClassificationTask(model) if cfg.task == "classification" else CausalLMTask(model)


def train_dataset(cfg: Config, split: SplitInfo) -> ShardBatchDataset:
    order = GlobalOrder([sh.num_samples for sh in split.shards], cfg.train.seed, cfg.data.shuffle_window)
    if cfg.model.name == "vit":
        return ImageBatchDataset(split, order, image_spec(cfg, train=True), cfg.train.seed, train=True)
    return TokenBatchDataset(split, order, cfg.model.seq_len, cfg.model.vocab_size, cfg.train.seed, cfg.data.on_error,
                             cfg.data.max_member_bytes)


def make_evaluator(cfg: Config, train_split: SplitInfo, eval_split: SplitInfo, ps: ParallelState, autocast: Any) -> Any:
    dp = {"dp_rank": ps.dp_rank, "dp_size": ps.dp, "dp_group": ps.group("dp"), "device": ps.device}
    if cfg.model.name == "vit":
        return ClassificationEvaluator(
            cfg.eval, train_split, eval_split, image_spec(cfg, train=False), cfg.model.num_classes,
            autocast=autocast, num_workers=cfg.data.num_workers, **dp,
        )
    return CausalLMEvaluator(eval_split, cfg.model.seq_len, cfg.model.vocab_size, cfg.eval.batch_size, autocast=autocast,
                             max_member_bytes=cfg.data.max_member_bytes, **dp)


def load_splits(cfg: Config) -> tuple[SplitInfo, SplitInfo]:
    train = load_split(cfg.data.dir, cfg.data.train_split)
    evals = load_split(cfg.data.dir, cfg.data.eval_split)
    for info in (train, evals):
        if info.num_classes > cfg.model.num_classes:
            raise ConfigError(
                f"config key 'model.num_classes' ({cfg.model.num_classes}) is smaller than the "
                f"{info.num_classes} classes recorded in {cfg.data.dir}/index.json"
            )
    if evals.indexed:  # counts come from the index; a shard damaged since would silently shrink the eval set
        check_shards(evals)
    for info in (train, evals):
        for damaged in info.damaged_shards:
            log.warning("damaged shard in %s, readable part kept: %s", info.root, damaged)
    return train, evals


def build_trainer(cfg: Config, ps: ParallelState | None = None) -> Trainer:
    """Everything a run needs, on this rank's part of the mesh (single process when ``ps`` is None)."""
    ps = ps or ParallelState.create(cfg.parallel, LaunchEnv())
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    if ps.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.train.tf32
    batches = plan_batches(cfg, ps.dp, ps.pp)
    check_optimizer(cfg.optim.name, ps.tp, cfg.parallel.zero, ps.dp)  # an impossible layout fails before any work
    if ps.rank == 0:
        ensure_data(cfg)
    ps.barrier()  # other ranks read the shards rank 0 may just have written
    train_split, eval_split = load_splits(cfg)
    param_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
    with torch.device("meta"):  # names for parameter groups, from the whole (unsplit) model
        full = build_model(cfg)
    pipeline = None
    if ps.pp > 1:
        task = make_task(cfg, nn.Identity())

        def build_stage(blocks: list[str], first: bool, last: bool) -> nn.Module:
            stage = build_model(cfg)  # same seed on every rank: stages hold slices of one init
            stage.prune_for_stage(blocks, first, last)
            return parallelize(stage.to(ps.device), cfg, ps, param_dtype)

        pipeline = Pipeline(ps, cfg.parallel, build_stage, list(full.blocks.keys()), task.pipeline_loss,
                            batches.pipeline_microbatches)
        parts = pipeline.parts  # the schedule splits the per-rank batch itself
        task.model = PipelineModel(pipeline)
    else:
        # initialised on the CPU from the seed (the same numbers on any device), then moved
        parts = [parallelize(build_model(cfg).to(ps.device), cfg, ps, param_dtype)]
        task = make_task(cfg, parts[0])
    model = merge_parts(parts)
    dp = DataParallel(parts, ps, cfg.parallel.zero)
    # after parallelize: the optimizer must see the sharded parameters
    optimizer = build_optimizer(model, cfg.optim, full.no_weight_decay(), full.head_param_names())
    schedule = LRSchedule(optimizer, cfg.optim.lr, schedule_spec(cfg))
    stream = TrainStream(
        train_dataset(cfg, train_split), batches.global_batch, batches.micro, dp_rank=ps.dp_rank, dp_size=ps.dp,
        num_workers=cfg.data.num_workers,
        max_error_fraction=cfg.data.max_error_fraction if cfg.data.on_error == "skip" else 1.0,
        error_budget_min_samples=cfg.data.error_budget_min_samples, pin_memory=ps.device.type == "cuda",
    )
    checkpointer = Checkpointer(
        cfg.run.dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, ps.rank, ps.world_size, ps.barrier,
        group=ps.side_group(), config_text=dump_yaml(cfg), write_threads=cfg.checkpoint.write_threads,
        keep_aside=cfg.checkpoint.keep_aside, allow_changes=cfg.resume_allow_changes,
    )
    components = [EMA(model, cfg.ema.decay, cfg.ema.eval)] if cfg.ema.decay > 0 else []
    trainer = Trainer(cfg, model, task, optimizer, schedule, stream, checkpointer, parallel=ps, dp=dp, pipeline=pipeline,
                      components=components)
    trainer.evaluator = make_evaluator(cfg, train_split, eval_split, ps, trainer.autocast)
    flops = train_flops_per_sample(full, cfg)
    log.info(
        "model: %s, %.2fM params, %.3f GFLOP/sample (train); data: %d train / %d eval samples",
        cfg.model.name, full.num_params() / 1e6, flops / 1e9, train_split.num_samples, eval_split.num_samples,
    )
    return trainer


def train_flops_per_sample(model: nn.Module, cfg: Config) -> float:
    """Model FLOPs of one training sample (forward + backward) of the unsharded model."""
    if isinstance(model, ViT):
        return float(model.train_flops_per_sample())
    return float(model.train_flops_per_token(cfg.model.seq_len) * cfg.model.seq_len)


def schedule_spec(cfg: Config) -> ScheduleSpec:
    s = cfg.schedule
    return ScheduleSpec(cfg.train.steps, s.warmup_steps, s.decay, s.rsqrt_timescale, s.cooldown_steps, s.final_lr_ratio)
