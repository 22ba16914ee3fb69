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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from bigtrain import faults
from bigtrain.checkpoint import (
    Checkpointer,
    CheckpointError,
    CheckpointSaveError,
    CorruptCheckpoint,
    ModelState,
    OptimizerState,
    RNGState,
    ScalarState,
)
from bigtrain.components.base import CORE_KEYS, TrainComponent
from bigtrain.config.schema import Config
from bigtrain.distributed.data_parallel import DataParallel
from bigtrain.distributed.mesh import LaunchEnv, ParallelState
from bigtrain.distributed.pipeline import Pipeline
from bigtrain.exits import EXIT_OK, EXIT_REQUEUE, FinalEvalFailed, TrainingDiverged
from bigtrain.metrics import MetricsLogger, Progress
from bigtrain.optim import LRSchedule
from bigtrain.resilience import NumericalGuard, PreemptionFlag, agree, early_signal
from bigtrain.tasks.protocol import batch_to_device

log = logging.getLogger(__name__)


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak host RSS of this process and, on CUDA, peak allocated / reserved device memory since the
    last call (GB): what a user sizing a job looks at."""
    import resource

    out = {"host_peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux
    if device.type == "cuda":
        out["gpu_peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["gpu_peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / 2**30
        torch.cuda.reset_peak_memory_stats(device)
    return out


class Stream(Protocol):
    """What the trainer needs from a data stream (see data_pipeline.TrainStream)."""

    consumed_samples: int

    def next_step(self) -> list[dict[str, Any]]: ...
    def skip(self, n: int) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
    def source_samples(self) -> dict[str, int]: ...


@dataclass
class TrainerState:
    step: int = 0
    samples_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite
    data_skipped: int = 0  # bad samples replaced by weight-0 substitutes, summed over dp ranks
    best_eval: float = field(default=-math.inf)  # best value of the evaluator's best_metric (negated if lower is better)
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
        components: list[TrainComponent] | None = None,
    ) -> None:
        self.cfg, self.model, self.task = cfg, model, task
        self.optimizer, self.schedule, self.stream = optimizer, schedule, stream
        self.checkpointer, self.evaluator = checkpointer, evaluator
        self.ps = parallel or ParallelState(cfg.parallel, LaunchEnv())
        self.rank = self.ps.rank
        self.dp = dp or DataParallel([model], self.ps, zero=0)
        self.pipeline = pipeline
        self.components = list(components or [])
        for c in self.components:
            if c.name in CORE_KEYS or sum(o.name == c.name for o in self.components) > 1:
                raise ValueError(f"training component name {c.name!r} collides with another checkpoint key")
        # what evaluation runs: the model, or under PP the whole pipeline as one module
        self.eval_model: nn.Module = task.model if pipeline is not None else model
        self.samples_per_step = samples_per_step or cfg.train.global_batch_size
        self.state = TrainerState()
        self.metrics: MetricsLogger | None = None
        self._t_start = self._last_save_t = time.monotonic()
        self._committed_step = -1
        # what train.deadline must leave time for
        self._slowest_step_s = self._slowest_save_s = self._slowest_eval_s = 0.0
        self.last_eval: dict[str, float] = {}
        t = cfg.train
        self.preempt: PreemptionFlag | None = None  # set while fit() runs
        self._flags = [False] * 5  # the control flags agreed in the last step's reduction
        self.guard = NumericalGuard(t.max_bad_steps, t.spike_factor, t.spike_window)
        self.rollback_reason = ""  # set by train_step when the guard asks for a rollback
        self._bad_steps = 0  # how many steps (ending with the current one) the rollback blames
        self.rollbacks = 0
        # global-sample windows [start, end) of steps that forced a rollback, skipped when reached again
        self.skip_windows: list[tuple[int, int]] = []

    # --- state ------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        return {
            "model": ModelState(self.model),
            "optimizer": OptimizerState(self.model, self.optimizer),
            "lr_schedule": ScalarState(self.schedule),
            "dataloader": ScalarState(self.stream),
            "trainer": ScalarState(self.state),
            "rng": RNGState(self.rank),
            **{c.name: state for c in self.components if (state := c.stateful()) is not None},
        }

    def maybe_resume(self) -> int | None:
        """Restore per ``resume`` (see :class:`Checkpointer` for the timeline rules); returns the
        resumed step, or None for a new run (then ``init``, if set, loads model weights)."""
        ck, resume = self.checkpointer, self.cfg.resume
        ck.cleanup_temporaries()
        found: tuple[str, dict[str, Any]] | None = None
        if resume == "auto":
            found = ck.restore_latest(self.stateful(), check_config=True)
            if found is not None:
                ck.continue_branch(*found)
        elif resume != "never":
            try:
                meta = ck.load(resume, self.stateful(), check_config=True)
            except CorruptCheckpoint as exc:  # named explicitly: the user decides, no fallback
                raise CheckpointError(f"resume={resume}: {exc}") from None
            found = (resume, meta)
            newest = ck.agreed(ck.latest)
            if newest is not None and os.path.realpath(newest) == os.path.realpath(resume):
                ck.continue_branch(resume, meta)
            else:  # an older checkpoint: the newer ones of this run belong to an abandoned branch
                ck.start_branch({"path": os.path.abspath(resume), "step": meta["step"], "run_id": meta.get("run_id")})
        if found is None:
            ck.start_branch(None)
            if self.cfg.init:
                ck.load_weights(self.cfg.init, self.model)
            return None
        self._after_load(*found)
        log.info("resumed from %s (step %d)", found[0], self.state.step)
        return self.state.step

    def _after_load(self, path: str, meta: dict[str, Any]) -> None:
        self.schedule.apply()  # group LRs follow the restored schedule step, whatever the load order
        self.dp.drop_foreign_state(self.optimizer)
        for component in self.components:
            if component.name in meta.get("absent_keys", ()):  # added since the checkpoint: start from its model
                getattr(component, "on_absent_state", lambda: None)()
        self._committed_step = self.state.step
        self._last_save_t = time.monotonic()
        if meta["step"] != self.state.step:
            raise CorruptCheckpoint(f"checkpoint {path} marker says step {meta['step']} but holds step {self.state.step}")

    def save(self, asynchronous: bool = False) -> None:
        """Save this step (raises CheckpointSaveError if it cannot be written)."""
        if self._committed_step == self.state.step:
            return  # this exact state is already on disk (periodic save at the last step, or just resumed)
        t0 = time.monotonic()
        self.checkpointer.save(self.state.step, self.stateful(), {"samples_seen": self.state.samples_seen},
                               asynchronous=asynchronous)
        # an asynchronous save only shows its blocking part: the deadline margin covers the rest
        self._slowest_save_s = max(self._slowest_save_s, time.monotonic() - t0)
        self._committed_step = self.state.step
        self._last_save_t = time.monotonic()
        self._log({"step": self.state.step, "kind": "checkpoint", "async": asynchronous,
                   "blocked_s": self.checkpointer.last_blocked_s})

    def _save_failed(self, exc: CheckpointSaveError) -> None:
        """A periodic save failed (its files are already removed): training goes on, the next save retries."""
        log.error("%s; training continues, the next save will try again", exc)
        self._committed_step = -1
        self._log({"step": self.state.step, "kind": "checkpoint_failed", "reason": str(exc)})

    def _log(self, record: dict[str, Any]) -> None:
        """A metrics record, after any the checkpointer queued (e.g. checkpoint_corrupt at resume)."""
        if self.metrics is None:
            return
        for event in self.checkpointer.events:
            self.metrics.log({"step": self.state.step, **event})
        self.checkpointer.events.clear()
        if record:
            self.metrics.log(record)

    # --- one step -----------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast on this process's device (master weights stay fp32)."""
        if self.cfg.train.dtype == "bfloat16":
            return torch.autocast(device_type=self.ps.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self) -> dict[str, float]:
        """One optimizer step. It synchronizes the host with the device once: the logs, the squared
        gradient norm and the control flags (preemption, time budget, save due, asynchronous write
        state) travel in one fp64 vector, reduced over all ranks in one collective and read once;
        the guard's verdict, the clip and the control decisions all follow from it."""
        self._skip_bad_windows()
        batches = [batch_to_device(b, self.ps.device) for b in self.stream.next_step()]
        self.optimizer.zero_grad(set_to_none=True)
        n = len(batches)
        if self.pipeline is not None:
            logs = self._pipeline_forward_backward(batches)
        else:
            logs = {}
            for i, batch in enumerate(batches):
                with self.dp.no_sync(last_micro_batch=i == n - 1), self.autocast():
                    out = self.task(batch)
                    out["loss"] = self._inject_loss_faults(out["loss"])
                (out["loss"] / n).backward()
                for key, value in out.items():  # summed on the device: no host sync per micro-batch
                    v = value.detach().double() / n
                    logs[key] = logs[key] + v if key in logs else v
        self.dp.sync_grads()
        # bad samples met this step, counted once per dp rank (pp rank 0 only: all pp ranks read the batch)
        skipped = float(sum(b.get("num_errors", 0) for b in batches)) if self.ps.pp_rank == 0 else 0.0
        logs, grad_sq, self._flags = self._reduce_step(logs, skipped, self.dp.grad_sq_share())
        self.state.data_skipped += round(logs.pop("data_skipped") * self.ps.dp)  # mean over dp -> global sum
        # The schedule is the single source of truth for this step's LR: set it
        # here, after any checkpoint load that may have restored stale group LRs.
        lr = self.schedule.apply()
        grad_norm = math.sqrt(grad_sq) if not grad_sq < 0 else float("nan")  # nan/inf pass through
        self.dp.clip_grads(grad_norm, self.cfg.optim.grad_clip_norm)
        # loss and norm are reduced over all ranks, so every rank reaches the same verdict
        verdict = self.guard.check(logs.get("loss", 0.0), grad_norm)
        if verdict.action == "ok":
            self.dp.step(self.optimizer)
            for component in self.components:  # parameters are final on every rank here
                component.after_optimizer_step(self.state.step + 1)
        else:  # a non-finite or exploding update would damage the weights: skip it and count
            self.state.skipped_steps += 1
            log.warning("step %d: %s, update skipped", self.state.step, verdict.reason)
            if verdict.action == "rollback":
                self.rollback_reason = verdict.reason
                self._bad_steps = verdict.bad_steps
        logs["lr"] = lr
        logs["grad_norm"] = grad_norm
        self.schedule.step()
        self.state.step += 1
        self.state.samples_seen += self.samples_per_step
        return logs

    def _inject_loss_faults(self, loss: torch.Tensor) -> torch.Tensor:
        if faults.fires("nan_loss", self.state.step, self.rank):
            return loss * float("nan")
        if faults.fires("loss_scale", self.state.step, self.rank):
            return loss * 1000.0
        return loss

    def _pipeline_forward_backward(self, batches: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
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
        zero = torch.zeros((), dtype=torch.float64, device=self.ps.device)  # stages without the loss
        return {k: sum((m[k].double() for m in mbs), zero) / max(len(mbs), 1) for k in keys}

    def _control_flags(self) -> list[bool]:
        """This rank's view of: preemption signal, time budget over, save due, asynchronous write
        still running, asynchronous write failed (made global by :meth:`_reduce_step`)."""
        preempted = self.preempt is not None and self.preempt.received is not None
        return [preempted, self._over_budget(), self._save_due(), not self.checkpointer.pending_write_done(),
                self.checkpointer.pending_write_failed()]

    def _reduce_step(self, logs: dict[str, Any], skipped: float, grad_sq: torch.Tensor) -> tuple[dict[str, float], float, list[bool]]:
        """Everything a step must agree on, in one sum over all ranks: the logs (summed over
        pipeline stages — only the last has them — and averaged over data-parallel ranks; tensor-
        parallel ranks hold identical copies, so each rank adds 1/(dp x tp) of its value), this
        rank's share of the squared gradient norm, and the control flags (a sum > 0 means some rank
        raised it). Returns (logs, squared norm, flags), read from the device once."""
        keys = sorted(logs)
        flags = self._control_flags()
        share = 1.0 / (self.ps.dp * self.ps.tp)
        device = self.ps.device
        values = torch.stack([logs[k].to(device, torch.float64) for k in keys]) if keys else \
            torch.zeros(0, dtype=torch.float64, device=device)
        host = torch.tensor([skipped * share, *map(float, flags)], dtype=torch.float64)
        if device.type == "cuda":  # a copy from pageable memory would wait for the GPU's queue: a second sync
            host = host.pin_memory()
        vector = torch.cat([values * share, grad_sq.reshape(1), host.to(device, non_blocking=True)])
        if self.ps.world_size > 1:
            dist.all_reduce(vector)
        out = vector.tolist()  # the step's one host synchronization
        k = len(keys)
        reduced = dict(zip(keys, out[:k]), data_skipped=out[k + 1])
        return reduced, out[k], [v > 0 for v in out[k + 2 :]]

    # --- loop ---------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        if self.evaluator is None:
            return {}
        t0 = time.perf_counter()
        faults.in_evaluate(self.state.step, self.rank)
        with contextlib.ExitStack() as stack:
            for component in self.components:  # e.g. EMA weights swapped in
                stack.enter_context(component.evaluation())
            results = self.evaluator(self.eval_model)
        results["eval/seconds"] = time.perf_counter() - t0
        self._slowest_eval_s = max(self._slowest_eval_s, results["eval/seconds"])
        self.last_eval = results
        # the evaluator says which metric defines "best" and whether higher is better
        metric, higher = getattr(self.evaluator, "best_metric", ("", True))
        if metric in results:
            sign = 1.0 if higher else -1.0
            self.state.best_eval = max(self.state.best_eval, sign * results[metric])
        self._log({"step": self.state.step, "kind": "eval", **results})
        log.info("eval @ step %d: %s", self.state.step, {k: round(v, 4) for k, v in results.items()})
        return results

    def _over_budget(self) -> bool:
        budget, deadline = self.cfg.train.max_minutes, self.cfg.train.deadline
        if budget > 0 and (time.monotonic() - self._t_start) > budget * 60:
            return True
        if deadline <= 0:
            return False
        # The flags are read inside step N; a stop they call for happens after step N+1. Until then
        # run: the evaluation and save scheduled after step N, step N+1, then the stopping save.
        # Each is measured; the slowest seen so far counts.
        margin = self._slowest_step_s + self._slowest_save_s
        step, train, every_eval = self.state.step + 1, self.cfg.train, self.cfg.eval.every_steps
        if step < train.steps and every_eval and step % every_eval == 0:
            margin += self._slowest_eval_s
        every_save = self.cfg.checkpoint.every_steps
        if step < train.steps and (self._save_due() or (every_save and step % every_save == 0)):
            margin += self._slowest_save_s
        return time.time() + margin > deadline

    def _save_due(self) -> bool:
        minutes = self.cfg.checkpoint.every_minutes
        return minutes > 0 and (time.monotonic() - self._last_save_t) > minutes * 60

    def _control(self, preempt: PreemptionFlag) -> tuple[bool, bool, bool]:
        """(stop, save now, commit the async save), from the flags every rank agreed on in the step's
        reduction (a signal that arrives during the optimizer step is acted on one step later)."""
        signalled, budget, due, writing, failed = self._flags
        if failed and not writing:
            # A rank's shard is missing: committing would publish an incomplete checkpoint. Its files
            # are removed (a full disk must not stay full); training goes on, the next save retries.
            reason = self.checkpointer.abandon_pending()
            self._committed_step = -1
            self._log({"step": self.state.step, "kind": "checkpoint_failed", "reason": reason})
        if signalled or budget:
            t = self.cfg.train
            why = (f"signal {preempt.received or 'on another rank'}" if signalled
                   else f"train.max_minutes={t.max_minutes}" if t.max_minutes else f"train.deadline={t.deadline:.0f}")
            log.warning("%s at step %d: saving and stopping (exit %d to requeue)", why, self.state.step, EXIT_REQUEUE)
        commit = self.checkpointer.pending is not None and not writing and not failed
        return signalled or budget, due, commit

    def _skip_bad_windows(self) -> None:
        for start, end in self.skip_windows:
            if self.stream.consumed_samples == start:
                log.warning("skipping samples [%d, %d) that made step %d roll back", start, end, self.state.step)
                self.stream.skip(end - start)

    def rollback(self) -> None:
        """Reload the newest usable checkpoint after the guard gave up on the current weights."""
        reason, self.rollback_reason = self.rollback_reason, ""
        self.rollbacks += 1
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise TrainingDiverged(f"{reason}; train.max_rollbacks={self.cfg.train.max_rollbacks} exhausted")
        try:
            self.checkpointer.wait()
        except CheckpointSaveError as exc:
            self._save_failed(exc)
        end = self.stream.consumed_samples
        window = (end - self._bad_steps * self.samples_per_step, end)
        bad_step = self.state.step
        found = self.checkpointer.restore_latest(self.stateful())
        self._log({})  # checkpoints found unusable on the way
        if found is None:
            raise TrainingDiverged(f"{reason}; no checkpoint to roll back to (set checkpoint.every_steps)")
        path, meta = found
        self._after_load(path, meta)
        self.guard.reset()
        if self.cfg.train.rollback_skip_data:
            self.skip_windows.append(window)
        log.warning("step %d: %s -> rolled back to %s (step %d)%s", bad_step, reason, path, self.state.step,
                    f", samples {window} will be skipped" if self.cfg.train.rollback_skip_data else "")
        self._log({"step": bad_step, "kind": "rollback", "reason": reason, "to_step": self.state.step,
                   "skipped_window": list(window) if self.cfg.train.rollback_skip_data else None})

    def fit(self, metrics: MetricsLogger) -> int:
        """Train to ``train.steps``; returns EXIT_OK, or EXIT_REQUEUE after a preemption signal or
        the time budget (a checkpoint of the stopping step is committed before returning).

        The end of the run stays under the preemption handler: the final checkpoint is committed
        first, then the final evaluation runs (skipped, EXIT_REQUEUE, if a signal came before
        it: the requeued run resumes at the last step and only evaluates). Raises
        TrainingDiverged when the numerical guard cannot recover, CheckpointSaveError when the
        final or preemption save cannot be written, FinalEvalFailed when the final evaluation
        raises (the trained state is on disk by then)."""
        self.metrics = metrics
        self._log({})
        preempt = self.preempt = PreemptionFlag(self.cfg.train.preempt_signals)
        preempt.install()
        preempt.received = early_signal()  # a notice that came during start-up: stop after the first step
        progress = Progress(self.cfg.train.steps, self.state.step, self.cfg.log.progress, self.rank == 0,
                            interval_s=self.cfg.log.progress_every_s)
        try:
            status = self._loop(progress, preempt)
            progress.close()
            self._periodic(self.checkpointer.wait)  # an in-flight asynchronous save
            if status == EXIT_REQUEUE or self.cfg.checkpoint.save_final:
                self.save()  # synchronous: the process may be gone soon after
            if status == EXIT_OK and agree([preempt.received is not None], device=self.ps.device)[0]:
                log.warning("signal during the final save: the final evaluation runs when the job is resubmitted")
                status = EXIT_REQUEUE
            if status == EXIT_OK and self.cfg.eval.final:
                self._final_eval()
        finally:
            progress.close()
            preempt.restore()
            self.preempt = None
        self.checkpointer.wait()  # pruned checkpoints are gone when fit returns
        return status

    def _final_eval(self) -> None:
        try:
            self.evaluate()
        except Exception as exc:
            saved = self.checkpointer.head if self._committed_step == self.state.step else None
            log.error("final evaluation failed", exc_info=True)
            where = f"the trained state is saved in {saved}" if saved else "no final checkpoint (checkpoint.save_final=false)"
            raise FinalEvalFailed(f"{type(exc).__name__}: {exc}; {where}") from exc

    def _loop(self, progress: Progress, preempt: PreemptionFlag) -> int:
        cfg = self.cfg
        total, every = cfg.train.steps, cfg.log.every_steps
        window_t, window_n = 0.0, 0
        while self.state.step < total:
            t0 = time.perf_counter()
            logs = self.train_step()
            if self.rollback_reason:
                self.rollback()
                progress.reset(self.state.step)
                continue
            dt = time.perf_counter() - t0
            self._slowest_step_s = max(self._slowest_step_s, dt)
            self.state.train_seconds += dt
            window_t, window_n = window_t + dt, window_n + 1
            step = self.state.step
            progress.update({"loss": logs["loss"], "samples/s": self.samples_per_step * window_n / window_t})
            if step % every == 0 or step == total:
                self.metrics.log({  # type: ignore[union-attr]
                    "step": step, "kind": "train", **logs,
                    "samples_per_s": self.samples_per_step * window_n / window_t,
                    "step_time_s": window_t / window_n,
                    "samples_seen": self.state.samples_seen,
                    "data_skipped": self.state.data_skipped,
                    "skipped_steps": self.state.skipped_steps,
                    **self.stream.source_samples(),
                    **memory_stats(self.ps.device),
                })
                window_t, window_n = 0.0, 0
            stop, save_due, commit = self._control(preempt)
            if commit:
                self._periodic(self.checkpointer.commit_pending)
            if stop:
                return EXIT_REQUEUE
            if step == total:
                break
            if cfg.eval.every_steps and step % cfg.eval.every_steps == 0:
                self.evaluate()
            if save_due or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0):
                self._periodic(lambda: self.save(asynchronous=cfg.checkpoint.async_save))
        return EXIT_OK

    def _periodic(self, save: Callable[[], None]) -> None:
        try:
            save()
        except CheckpointSaveError as exc:
            self._save_failed(exc)
