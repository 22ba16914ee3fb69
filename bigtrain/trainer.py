"""The training loop: one loop for every objective.

The trainer knows nothing about images, tokens or diffusion. It asks the data
stream for this step's micro-batches, runs the task module on each (the task
returns ``{"loss": ..., **logs}``), steps the optimizer and LR schedule, and
handles logging, evaluation, checkpoints and the time budget.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState, ScalarState
from bigtrain.config.schema import Config
from bigtrain.distributed.data_parallel import DataParallel
from bigtrain.distributed.mesh import LaunchEnv, ParallelState
from bigtrain.distributed.pipeline import Pipeline
from bigtrain.metrics import MetricsLogger, Progress
from bigtrain.optim import LRSchedule

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_REQUEUE = 75  # stopped early (time budget / preemption) after saving: resubmit to continue


class Stream(Protocol):
    """What the trainer needs from a data stream (see data_pipeline.TrainStream)."""

    def next_step(self) -> list[dict[str, Any]]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite
    best_eval: float = field(default=-math.inf)
    train_seconds: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, type(getattr(self, key))(value))


class Trainer:
    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        task: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        stream: Stream,
        checkpointer: Checkpointer,
        evaluator: Callable[[nn.Module], dict[str, float]] | None = None,
        parallel: ParallelState | None = None,
        dp: DataParallel | None = None,
        pipeline: Pipeline | None = None,
        samples_per_step: int | None = None,
    ) -> None:
        self.cfg, self.model, self.task = cfg, model, task
        self.optimizer, self.schedule, self.stream = optimizer, schedule, stream
        self.checkpointer, self.evaluator = checkpointer, evaluator
        self.ps = parallel or ParallelState(cfg.parallel, LaunchEnv())
        self.rank = self.ps.rank
        self.dp = dp or DataParallel([model], self.ps, zero=0)
        self.pipeline = pipeline
        # what evaluation runs: the model, or under PP the whole pipeline as one module
        self.eval_model: nn.Module = task.model if pipeline is not None else model
        self.samples_per_step = samples_per_step or cfg.train.global_batch_size
        self.state = TrainerState()
        self.metrics: MetricsLogger | None = None
        self._t_start = time.monotonic()
        self._committed_step = -1
        self.last_eval: dict[str, float] = {}

    # --- state ------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_schedule": ScalarState(self.schedule),
            "dataloader": ScalarState(self.stream),
            "trainer": ScalarState(self.state),
            "rng": RNGState(self.rank),
        }

    def maybe_resume(self) -> int | None:
        path = self.checkpointer.resolve(self.cfg.resume)
        if path is None:
            return None
        meta = self.checkpointer.load(path, self.stateful())
        self.schedule.apply()  # group LRs follow the restored schedule step, whatever the load order
        self.dp.drop_foreign_state(self.optimizer)
        log.info("resumed from %s (step %d)", path, self.state.step)
        self._committed_step = self.state.step
        if meta["step"] != self.state.step:
            raise RuntimeError(f"checkpoint {path} marker says step {meta['step']} but holds step {self.state.step}")
        return self.state.step

    def save(self) -> None:
        if self._committed_step == self.state.step:
            return  # this exact state is already on disk (periodic save at the last step, or just resumed)
        self.checkpointer.save(self.state.step, self.stateful(), {"samples_seen": self.state.samples_seen})
        self._committed_step = self.state.step

    # --- one step -----------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        batches = self.stream.next_step()
        self.optimizer.zero_grad(set_to_none=True)
        logs: dict[str, float] = {}
        n = len(batches)
        if self.pipeline is not None:
            logs = self._pipeline_forward_backward(batches)
        else:
            for i, batch in enumerate(batches):
                with self.dp.no_sync(last_micro_batch=i == n - 1), self.autocast():
                    out = self.task(batch)
                (out["loss"] / n).backward()
                for key, value in out.items():
                    logs[key] = logs.get(key, 0.0) + float(value.detach()) / n
        self.dp.sync_grads()
        logs = self._reduce_logs(logs)
        # The schedule is the single source of truth for this step's LR: set it
        # here, after any checkpoint load that may have restored stale group LRs.
        lr = self.schedule.apply()
        grad_norm = self.dp.clip_grad_norm(self.cfg.optim.grad_clip_norm)
        if math.isfinite(grad_norm) and math.isfinite(logs.get("loss", 0.0)):  # same verdict on every rank
            self.dp.step(self.optimizer)
        else:  # a non-finite update would destroy the weights; skip it and count
            self.state.skipped_steps += 1
            log.warning("step %d: non-finite loss/grad norm, update skipped", self.state.step)
        logs["lr"] = lr
        logs["grad_norm"] = grad_norm
        self.schedule.step()
        self.state.step += 1
        self.state.samples_seen += self.samples_per_step
        return logs

    def _pipeline_forward_backward(self, batches: list[dict[str, Any]]) -> dict[str, float]:
        """The schedule splits this rank's batch into micro-batches and runs forward/backward;
        losses and task logs exist on the last stage only (zeros elsewhere, summed later)."""
        assert self.pipeline is not None
        batch = batches[0]  # under PP the stream yields the whole per-rank batch
        self.task.pipeline_logs.clear()
        with self.autocast():
            losses = self.pipeline.step(self.task.pipeline_inputs(batch), self.task.pipeline_target(batch))
        # The schedule's first step also runs the loss on placeholder tensors to infer
        # shapes: only the last len(losses) records belong to real micro-batches.
        mbs = self.task.pipeline_logs[len(self.task.pipeline_logs) - len(losses) :] if losses else []
        keys = ["loss", *sorted(k for k in self.task.pipeline_log_keys if k != "loss")]
        return {k: sum(m[k] for m in mbs) / len(mbs) if mbs else 0.0 for k in keys}

    def _reduce_logs(self, logs: dict[str, float]) -> dict[str, float]:
        """Logs of the whole step: summed over pipeline stages (only the last has them),
        averaged over data-parallel ranks (equal local batch sizes)."""
        if self.ps.dp == 1 and self.ps.pp == 1:
            return logs
        keys = sorted(logs)
        values = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
        if self.ps.pp > 1:
            dist.all_reduce(values, group=self.ps.group("pp"))
        if self.ps.dp > 1:
            dist.all_reduce(values, group=self.ps.group("dp"))
        return {k: float(v) / self.ps.dp for k, v in zip(keys, values)}

    # --- loop ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        t0 = time.perf_counter()
        results = self.evaluator(self.eval_model)
        results["eval/seconds"] = time.perf_counter() - t0
        self.last_eval = results
        top1 = results.get("eval/top1")
        if top1 is not None:
            self.state.best_eval = max(self.state.best_eval, top1)
        if self.metrics:
            self.metrics.log({"step": self.state.step, "kind": "eval", **results})
        log.info("eval @ step %d: %s", self.state.step, {k: round(v, 4) for k, v in results.items()})
        return results

    def _over_budget(self) -> bool:
        budget = self.cfg.train.max_minutes
        return budget > 0 and (time.monotonic() - self._t_start) > budget * 60

    def fit(self, metrics: MetricsLogger) -> int:
        """Train to ``train.steps``; returns an exit code (EXIT_OK or EXIT_REQUEUE)."""
        self.metrics = metrics
        cfg = self.cfg
        total, every = cfg.train.steps, cfg.log.every_steps
        progress = Progress(total, self.state.step, cfg.log.progress, self.rank == 0)
        window_t, window_n = 0.0, 0
        status = EXIT_OK
        try:
            while self.state.step < total:
                t0 = time.perf_counter()
                logs = self.train_step()
                dt = time.perf_counter() - t0
                self.state.train_seconds += dt
                window_t, window_n = window_t + dt, window_n + 1
                step = self.state.step
                progress.update({"loss": logs["loss"], "samples/s": self.samples_per_step * window_n / window_t})
                if step % every == 0 or step == total:
                    metrics.log({
                        "step": step, "kind": "train", **logs,
                        "samples_per_s": self.samples_per_step * window_n / window_t,
                        "step_time_s": window_t / window_n,
                        "samples_seen": self.state.samples_seen,
                        "data_skipped": self.stream.state_dict().get("skipped_samples", 0),
                        "skipped_steps": self.state.skipped_steps,
                    })
                    window_t, window_n = 0.0, 0
                if step == total:
                    break
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                    self.evaluate()
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0:
                    self.save()
                if self._over_budget():
                    log.warning("train.max_minutes=%s reached at step %d: saving and stopping", cfg.train.max_minutes, step)
                    status = EXIT_REQUEUE
                    break
        finally:
            progress.close()
        if status == EXIT_OK:
            self.evaluate()
        if status == EXIT_REQUEUE or cfg.checkpoint.save_final:
            self.save()
        return status
