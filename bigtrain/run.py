"""The one public way to turn a validated config into a ready run.

``bigtrain train`` / ``bigtrain eval``, the parity harness and the benchmarks all call
:func:`prepare_run`, so a run is set up the same way everywhere: the mesh and device
(``ParallelState``), rank-0 logging, the trainer with its model, data, optimizer and
checkpointer, and — for training — the resolved config written into the run directory, the
resume, and the metrics log.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import asdict, dataclass

from bigtrain.config import Config, dump_yaml
from bigtrain.distributed import LaunchEnv, ParallelState
from bigtrain.metrics import MetricsLogger, setup_logging
from bigtrain.recipes import build_trainer
from bigtrain.trainer import Trainer

log = logging.getLogger(__name__)


def ranks_on_this_node(world_size: int) -> int:
    """torchrun's LOCAL_WORLD_SIZE, Slurm's tasks per node ('4' or '4(x2)'), else the whole world."""
    value = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or ""
    m = re.match(r"\d+", value)
    return int(m.group()) if m else world_size


@dataclass
class Run:
    cfg: Config
    ps: ParallelState
    trainer: Trainer
    metrics: MetricsLogger | None  # None unless prepared for training
    resumed_step: int | None  # the step a training run resumed at (None: a new run)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def prepare_run(cfg: Config, ps: ParallelState | None = None, training: bool = True) -> Run:
    """Everything a run needs on this rank. ``training``: write the resolved config to
    ``run.dir/config.yaml``, resume per ``resume`` (or ``init``), open ``metrics.jsonl`` (and wandb);
    otherwise only the trainer (evaluation, measurements)."""
    ps = ps or ParallelState.create(cfg.parallel, LaunchEnv.detect())
    setup_logging(ps.rank)
    from bigtrain.memory import prepare_memory

    # before the model exists: refuse a training run that cannot fit, tune the host allocator where memory is tight
    est = prepare_memory(cfg, ps.world_size, ranks_on_this_node(ps.world_size), ps.device, refuse=training)
    if est is not None and training:
        log.info("%s", est.table())
    trainer = build_trainer(cfg, ps)
    if not training:
        return Run(cfg, ps, trainer, None, None)
    if ps.rank == 0:
        os.makedirs(cfg.run.dir, exist_ok=True)
        with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
            f.write(f"# resolved config, written {time.strftime('%Y-%m-%d %H:%M:%S')}\n" + dump_yaml(cfg))
    resumed = trainer.maybe_resume()
    metrics = MetricsLogger(cfg.run.dir, ps.rank == 0, resume_step=resumed)
    if cfg.log.wandb:
        name = cfg.run.name or os.path.basename(os.path.normpath(cfg.run.dir))
        metrics.enable_wandb(cfg.log.wandb_project, name, asdict(cfg), cfg.run.dir)
    return Run(cfg, ps, trainer, metrics, resumed)
