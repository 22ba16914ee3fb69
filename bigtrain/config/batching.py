"""How a step's global batch is divided: every divisibility rule, in one place.

A step takes ``train.global_batch_size`` samples; each of the ``dp`` data-parallel ranks gets an
equal contiguous share, which it runs as accumulated micro-batches of ``train.micro_batch_size``
(0 = the whole share at once) or, under pipeline parallelism, as ``parallel.microbatches``
pipeline micro-batches (default: share / micro-batch size, else ``pp``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigtrain.config.core import ConfigError

if TYPE_CHECKING:
    from bigtrain.config.schema import Config

MULTI_STAGE_SCHEDULES = ("interleaved_1f1b", "zbv")  # several stages per rank: micro-batches in multiples of pp


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    per_rank: int  # samples per data-parallel rank and step
    micro: int  # samples per forward/backward (the pipeline splits per_rank itself: micro == per_rank)
    accum_steps: int  # forward/backward passes per rank and step (1 under pipeline parallelism)
    pipeline_microbatches: int  # micro-batches the pipeline schedule splits per_rank into (0 without PP)


def plan_batches(cfg: Config, dp: int = 1, pp: int = 1) -> BatchPlan:
    """The division for ``dp`` x ``pp`` ranks, or a ConfigError naming the key that does not divide.
    ``Config.validate`` calls it with dp = pp = 1 (what a config alone decides)."""
    t = cfg.train
    per_rank, rem = divmod(t.global_batch_size, dp)
    if rem:
        raise ConfigError(f"config key 'train.global_batch_size' ({t.global_batch_size}) is not divisible by the "
                          f"data-parallel size {dp}")
    micro = t.micro_batch_size or per_rank
    if per_rank % micro:
        what = f"'train.global_batch_size' ({t.global_batch_size}) is not divisible by 'train.micro_batch_size' ({micro})" \
            if dp == 1 else f"'train.micro_batch_size' ({micro}) does not divide the per-rank batch {per_rank} " \
                            f"(global {t.global_batch_size} / dp {dp})"
        raise ConfigError(f"config key {what}")
    if pp == 1:
        return BatchPlan(t.global_batch_size, per_rank, micro, per_rank // micro, 0)
    n = cfg.parallel.microbatches or (per_rank // t.micro_batch_size if t.micro_batch_size else pp)
    if per_rank % n:
        raise ConfigError(f"config key 'parallel.microbatches' ({n}) does not divide the per-rank batch {per_rank}")
    if cfg.parallel.pp_schedule in MULTI_STAGE_SCHEDULES and n % pp:
        raise ConfigError(f"parallel.pp_schedule={cfg.parallel.pp_schedule} needs pipeline micro-batches ({n}) "
                          f"divisible by parallel.pp={pp}")
    return BatchPlan(t.global_batch_size, per_rank, per_rank, 1, n)
