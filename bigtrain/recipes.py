"""Turn a validated :class:`Config` into the pieces the trainer runs.

The model family named in ``model.family`` supplies the model, its parallelization, task, data
and evaluator (:mod:`bigtrain.families`); this module assembles them with the layout, optimizer,
data stream and checkpointer. Neither it nor the trainer branches on the family or the task. The
builders take a :class:`~bigtrain.config.registry.RunSpec` (the config with its families resolved
once), not the config's ``model.family`` string.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.checkpoint import Checkpointer
from bigtrain.components import EMA
from bigtrain.components.teacher import Teacher
from bigtrain.config import Config, ConfigError, dump_yaml
from bigtrain.config.batching import plan_batches
from bigtrain.distributed import LaunchEnv, ParallelState, parallelize_blocks
from bigtrain.distributed.activation import clean_name
from bigtrain.distributed.sharded_init import NotRecordable, materialize, record_build
from bigtrain.distributed.data_parallel import DataParallel
from bigtrain.distributed.pipeline import Pipeline, PipelineModel, merge_parts
from bigtrain.families import EvalContext, RunSpec
from bigtrain.optim import LRSchedule, ScheduleSpec, build_optimizer, check_optimizer
from bigtrain.optim.builder import head_param_names, no_weight_decay_names
from bigtrain.trainer import Trainer
from data_pipeline import DataError, SplitInfo, TrainStream, load_split
from data_pipeline.index import check_shards, find_foreign_shards, split_entry
from data_pipeline.logits import StoredLogits
from data_pipeline.spec import load_mixture, load_spec
from data_pipeline.writer import write_set_atomically

log = logging.getLogger(__name__)


def ensure_data(run: RunSpec) -> None:
    """Write the family's embedded data set (``data.source``) into ``data.dir`` if it holds no shards
    for the train split.

    The set is written into a temporary directory and renamed into place when complete, and
    only where ``data.dir`` does not exist or is empty: a directory of the user's that is not a
    shard set is never written into."""
    cfg = run.cfg
    d = cfg.data
    if d.train or d.sources:  # shards named by a spec are the user's: nothing is written
        return
    have_index = bool(split_entry(d.dir, d.train_split))
    if have_index or (os.path.isdir(d.dir) and find_foreign_shards(d.dir, d.train_split)):
        return
    if d.source == "none":
        raise DataError(f"data.dir={d.dir!r} has no shards for split '{d.train_split}' and data.source=none")
    if os.path.exists(d.dir) and (not os.path.isdir(d.dir) or os.listdir(d.dir)):
        raise DataError(
            f"data.dir={d.dir!r} is not empty and holds no shards for split '{d.train_split}': refusing to write "
            f"data.source={d.source} into it (point data.dir at a new or empty directory, or set data.source=none)")
    log.info("writing data.source=%s into %s", d.source, d.dir)
    write = run.family.data_sources[d.source]
    write_set_atomically(d.dir, lambda tmp: write(cfg, tmp))


def build_model(run: RunSpec, section: str = "model") -> nn.Module:
    """The one-device model of a run's model section (``teacher`` for the teacher); works under
    ``torch.device("meta")``. Initialisation depends on ``train.seed`` only, not on what ran before."""
    model_cfg, family = run.section(section)
    torch.manual_seed(run.cfg.train.seed)
    return family.build(model_cfg)


def parallelize(run: RunSpec, model: nn.Module, ps: ParallelState, param_dtype: torch.dtype | None) -> nn.Module:
    family, cfg = run.family, run.cfg
    if family.parallelize is None:
        return parallelize_blocks(model, ps, cfg.parallel, param_dtype)
    return family.parallelize(model, ps, cfg, param_dtype)


def build_parallel(run: RunSpec, ps: ParallelState, param_dtype: torch.dtype | None,
                   prune: Callable[[nn.Module], None] | None = None, section: str = "model") -> nn.Module:
    """This rank's parallelized model (or pipeline stage, cut by ``prune``) of a model section. It is
    built on ``meta``, parallelized there and materialized empty on the device; then each rank fills
    only the shards it holds: from pretrained weights, read by the source, or from the seed, by
    replaying the recorded initialisation one tensor at a time (the values a CPU build gives). No
    rank ever holds the whole model. A builder the recording cannot replay (``parallel.sharded_init``
    false, or see :mod:`bigtrain.distributed.sharded_init`) is built whole on the CPU and moved."""
    model_cfg, family = run.section(section)
    source = family.pretrained(model_cfg) if family.pretrained is not None else None
    if section != "model":  # the family's parallelize reads the model section: this one, built by its family
        run = RunSpec(dataclasses.replace(run.cfg, model=model_cfg), family)
    cfg = run.cfg

    def build() -> nn.Module:
        model = build_model(run)
        if prune is not None:
            prune(model)
        return model

    if source is not None:
        with torch.device("meta"):
            model = build()
        model = parallelize(run, model, ps, param_dtype)
        model.to_empty(device=ps.device)
        read = source.load(model)
        log.info("loaded %s: %d tensors, %d elements on this rank", source.path, read["tensors"], read["elements"])
        return model
    built = None
    if cfg.parallel.sharded_init:
        try:
            built = record_build(build)
        except (NotRecordable, NotImplementedError, RuntimeError) as exc:  # e.g. .item() on meta: a real error recurs below
            log.warning("sharded init: cannot record %s's initialisation (%s); building it whole on the CPU",
                        model_cfg.family, exc)
    if built is None:
        return parallelize(run, build().to(ps.device), ps, param_dtype)
    model = parallelize(run, built.model, ps, param_dtype)
    stats = materialize(built, model, ps.device, cfg.train.seed, clean_name)
    log.info("initialised %d elements on this rank from seed %d (%d ops replayed, host peak %.1f MiB in flight)",
             stats["elements"], cfg.train.seed, stats["ops"], stats["peak_bytes"] / 2**20)
    return model


def build_teacher(run: RunSpec, ps: ParallelState, param_dtype: torch.dtype | None) -> Teacher:
    """The frozen teacher on the student's mesh: its pretrained weights (required), tensor-parallel
    like the student, FSDP-sharded over data parallel (``distill.shard_teacher``), no activation
    checkpointing (it never runs backward)."""
    cfg = run.cfg
    teacher_cfg, family = run.section("teacher")
    source = family.pretrained(teacher_cfg) if family.pretrained is not None else None
    if source is None:
        raise ConfigError(f"the teacher (teacher.family={cfg.teacher.family}) has no weights to load: name them in "
                          "the teacher section (e.g. teacher.pretrained=DIR)")
    layout = dataclasses.replace(cfg.parallel, zero=3 if cfg.distill.shard_teacher else 0,
                                 activation_checkpointing="none")
    model = build_parallel(run.replace(parallel=layout), ps, param_dtype, section="teacher")
    return Teacher(model, source.path)


def make_task(run: RunSpec, model: nn.Module, teacher: nn.Module | None = None) -> nn.Module:
    """The run's objective (``task`` of its family), wrapping ``model`` (and the teacher, for tasks
    that use one)."""
    return run.task(run.cfg, model, teacher) if run.uses_teacher else run.task(run.cfg, model)


def train_dataset(run: RunSpec, split: SplitInfo) -> Any:
    return run.family.train_data(run.cfg, split)


def train_flops_per_sample(model: nn.Module, run: RunSpec) -> float:
    """Model FLOPs of one training sample (forward + backward) of the unsharded model."""
    return float(run.family.flops_per_sample(model, run.cfg.model))


def data_workers(cfg: Config, ps: ParallelState) -> int:
    """``data.num_workers``, with -1 resolved: on a GPU, the cores this process may use shared by the
    ranks of its node, one left for the rank itself (at most 8); on the CPU, none."""
    if cfg.data.num_workers >= 0:
        return cfg.data.num_workers
    if ps.device.type != "cuda":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # torchrun's LOCAL_WORLD_SIZE, or Slurm's tasks per node ("4", "4(x2)", "4,2": the first count)
    given = re.match(r"\d+", os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", ""))
    per_node = int(given.group()) if given else max(torch.cuda.device_count(), 1)
    # srun binds each task to its own cores (affinity already per rank); torchrun's ranks share them
    share = cores if os.environ.get("SLURM_CPUS_PER_TASK") else cores // max(per_node, 1)
    return max(0, min(8, share - 1))


def make_evaluator(run: RunSpec, train_split: SplitInfo, eval_split: SplitInfo, ps: ParallelState, autocast: Any,
                   step: Callable[[], int] = lambda: 0) -> Any:
    cfg = run.cfg
    ctx = EvalContext(dp_rank=ps.dp_rank, dp_size=ps.dp, dp_group=ps.group("dp"), device=ps.device, autocast=autocast,
                      num_workers=data_workers(cfg, ps), run_dir=cfg.run.dir, step=step, rank=ps.rank,
                      progress_mode=cfg.log.progress, progress_every_s=cfg.log.progress_every_s)
    return run.family.evaluator(cfg, train_split, eval_split, ctx)


def data_split(cfg: Config, which: str) -> SplitInfo:
    """The ``train`` or ``eval`` split: named by a shard spec (``data.train`` / ``data.eval``), or
    ``data.dir`` + ``data.train_split`` / ``data.eval_split``."""
    d = cfg.data
    if which == "train" and d.sources:
        split = load_mixture([(s.spec, s.weight) for s in d.sources], "data.sources", d.cache_dir)
        for i, (s, (count, _)) in enumerate(zip(d.sources, split.sources)):
            log.info("data source %d: %s, %d shards, weight %g", i, s.spec, count, s.weight)
        return split
    spec, name = (d.train, d.train_split) if which == "train" else (d.eval, d.eval_split)
    return load_spec(spec, f"data.{which}", d.cache_dir) if spec else load_split(d.dir, name)


def load_splits(cfg: Config) -> tuple[SplitInfo, SplitInfo]:
    train, evals = data_split(cfg, "train"), data_split(cfg, "eval")
    num_classes = getattr(cfg.model, "num_classes", None)  # a classifier's output count
    for info in (train, evals):
        if num_classes is not None and info.num_classes > num_classes:
            raise ConfigError(
                f"config key 'model.num_classes' ({num_classes}) is smaller than the "
                f"{info.num_classes} classes recorded in {info.root}/index.json"
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
    run = RunSpec.of(cfg)  # the families resolved once, for every builder below
    family = run.family
    batches = plan_batches(cfg, ps.dp, ps.pp)
    check_optimizer(cfg.optim.name, ps.tp, cfg.parallel.zero, ps.dp)  # an impossible layout fails before any work
    if ps.pp > 1 and not family.pipeline:
        raise ConfigError(f"model.family={cfg.model.family} does not split into pipeline stages: parallel.pp must be 1 "
                          f"(got {ps.pp})")
    if ps.pp > 1 and run.uses_teacher:
        raise ConfigError(f"task={cfg.task} runs a teacher beside the student, which the pipeline schedules do not "
                          f"carry: parallel.pp must be 1 (got {ps.pp})")
    if ps.rank == 0:
        ensure_data(run)
    ps.barrier()  # other ranks read the shards rank 0 may just have written
    train_split, eval_split = load_splits(cfg)
    param_dtype = torch.bfloat16 if cfg.train.dtype == "bfloat16" else None
    with torch.device("meta"):  # names for parameter groups, from the whole (unsplit) model
        full = build_model(run)
    pipeline, teacher = None, None
    if ps.pp > 1:
        task = make_task(run, nn.Identity())

        def build_stage(blocks: list[str], first: bool, last: bool) -> nn.Module:
            # same seed on every rank: stages hold slices of one init
            return build_parallel(run, ps, param_dtype, lambda m: m.prune_for_stage(blocks, first, last))

        pipeline = Pipeline(ps, cfg.parallel, build_stage, list(full.blocks.keys()), task.pipeline_loss,
                            batches.pipeline_microbatches)
        parts = pipeline.parts  # the schedule splits the per-rank batch itself
        task.model = PipelineModel(pipeline)
    else:
        parts = [build_parallel(run, ps, param_dtype)]
        if cfg.distill.logits:  # the store stands in for the teacher, which is never built
            teacher = Teacher(None, cfg.distill.logits)
        elif run.uses_teacher:
            teacher = build_teacher(run, ps, param_dtype)
        task = make_task(run, parts[0], teacher.model if teacher else None)
    model = merge_parts(parts)
    dp = DataParallel(parts, ps, cfg.parallel.zero)
    # after parallelize: the optimizer must see the sharded parameters
    optimizer = build_optimizer(model, cfg.optim, no_weight_decay_names(full), head_param_names(full))
    schedule = LRSchedule(optimizer, cfg.optim.lr, schedule_spec(cfg))
    dataset = train_dataset(run, train_split)
    if cfg.distill.logits:
        dataset.stored = verified_store(cfg.distill.logits, ps)
    stream = TrainStream(
        dataset, batches.global_batch, batches.micro, dp_rank=ps.dp_rank, dp_size=ps.dp,
        num_workers=data_workers(cfg, ps),
        max_error_fraction=cfg.data.max_error_fraction if cfg.data.on_error == "skip" else 1.0,
        error_budget_min_samples=cfg.data.error_budget_min_samples, pin_memory=ps.device.type == "cuda",
    )
    checkpointer = Checkpointer(
        cfg.run.dir, cfg.checkpoint.keep_last, cfg.checkpoint.keep_every, ps.rank, ps.world_size, ps.barrier,
        group=ps.side_group(), config_text=dump_yaml(cfg), write_threads=cfg.checkpoint.write_threads,
        keep_aside=cfg.checkpoint.keep_aside, allow_changes=cfg.resume_allow_changes,
    )
    components: list[Any] = [EMA(model, cfg.ema.decay, cfg.ema.eval, cfg.ema.warmup_power)] if cfg.ema.decay > 0 else []
    if teacher is not None:
        components.append(teacher)
    trainer = Trainer(cfg, model, task, optimizer, schedule, stream, checkpointer, parallel=ps, dp=dp, pipeline=pipeline,
                      components=components)
    trainer.evaluator = make_evaluator(run, train_split, eval_split, ps, trainer.autocast, lambda: trainer.state.step)
    log.info(
        "model: %s/%s, %.2fM params, %.3f GFLOP/sample (train); data: %d train / %d eval samples",
        family.name, cfg.model.variant, num_params(full) / 1e6, family.flops_per_sample(full, cfg.model) / 1e9,
        train_split.num_samples, eval_split.num_samples,
    )
    return trainer


def verified_store(path: str, ps: ParallelState) -> StoredLogits:
    """A logit store whose shards all pass their SHA-256 (each rank reads its share, all ranks agree)
    before the first step: a damaged shard is one line naming it, on every rank, not a bad update."""
    store = StoredLogits(path)
    problems = store.verify(ps.rank, ps.world_size)
    if ps.distributed:
        gathered: list[Any] = [None] * ps.world_size
        dist.all_gather_object(gathered, problems, group=ps.side_group())
        problems = [p for rank_problems in gathered for p in rank_problems]
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)
    return store


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def schedule_spec(cfg: Config) -> ScheduleSpec:
    s = cfg.schedule
    return ScheduleSpec(cfg.train.steps, s.warmup_steps, s.decay, s.rsqrt_timescale, s.cooldown_steps, s.final_lr_ratio)
