"""Preemption signals, the per-step stop/save agreement between ranks, and the numerical guard.

Signals: the handler only sets a flag (no I/O, no locks: it may interrupt anything). The
trainer reads the flag between steps, finishes nothing half-way, saves and exits with
``EXIT_REQUEUE`` so a Slurm wrapper (or submitit) resubmits the job.

Agreement: a signal may reach one rank and not another, and wall clocks differ, so
"stop now" or "save now" decided locally would send ranks down different code paths
and deadlock the next collective. Every step the ranks MAX-reduce one small vector of
flags and act on the common result.
"""

from __future__ import annotations

import math
import os
import signal
from collections import deque
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist


class PreemptionFlag:
    """Records that one of ``signals`` arrived; installed for the duration of training."""

    def __init__(self, signals: list[str]) -> None:
        self.names = signals
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name

    def install(self) -> None:
        for name in self.names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handler)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def settle(status: int, signals: list[str]) -> None:
    """The run's outcome is decided (and, for a stop, saved): from now on a signal must not turn it
    into a kill. Under ``srun --kill-on-bad-exit`` the first rank to exit 75 makes Slurm terminate
    the others while they tear down; they leave with the same ``status``, so the step's exit code
    stays 75 (a requeue) instead of 143. A late preemption signal after a successful run is ignored."""
    for name in signals:
        sig = getattr(signal, name)
        if status == 0:
            if sig != signal.SIGTERM:  # someone who wants a finished process gone still gets it gone
                signal.signal(sig, signal.SIG_IGN)
        else:
            signal.signal(sig, lambda signum, frame: os._exit(status))


# Process start (python -m bigtrain): USR1/USR2 mean "you will be preempted soon" and their default
# action kills the process. Arriving while torch imports or the model is built or loaded (Slurm may
# send --signal up to a minute early), they would end the job with no save and an exit code that
# reads as a crash (not requeued). Remembered instead, training acts on them at its first step.
# SIGTERM keeps its default until training starts: a process stuck in start-up must stay killable.
_EARLY = PreemptionFlag(["SIGUSR1", "SIGUSR2"])


def catch_early_signals() -> None:
    _EARLY.install()


def early_signal() -> str | None:
    return _EARLY.received


def agree(flags: list[bool], group: dist.ProcessGroup | None = None, device: torch.device | None = None) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (identity without a process group).
    ``device``: where the group's backend reduces (the CUDA device for NCCL)."""
    import torch  # not at module level: python -m bigtrain imports this module before torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return flags
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


@dataclass
class GuardVerdict:
    action: str  # "ok" | "skip" (do not apply this update) | "rollback" (reload last checkpoint)
    reason: str = ""
    bad_steps: int = 0  # how many consecutive steps (ending with this one) are to blame


class NumericalGuard:
    """Decides what to do with a step from its (globally reduced) loss and gradient norm.

    * non-finite loss or gradient norm: skip the update; after ``max_bad_steps``
      consecutive ones, roll back (0 = never roll back, keep skipping);
    * loss above ``spike_factor`` x the mean of the last ``window`` accepted losses:
      skip and roll back (0 = off). The mean needs a full window first, so the
      noisy start of training never triggers it.

    Inputs are identical on every rank (reduced before the guard sees them), so
    every rank reaches the same verdict without communicating.
    """

    def __init__(self, max_bad_steps: int, spike_factor: float, window: int) -> None:
        self.max_bad_steps, self.spike_factor = max_bad_steps, spike_factor
        self.recent: deque[float] = deque(maxlen=window)
        self.consecutive_bad = 0

    def check(self, loss: float, grad_norm: float) -> GuardVerdict:
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.consecutive_bad += 1
            if self.max_bad_steps and self.consecutive_bad >= self.max_bad_steps:
                return GuardVerdict("rollback", f"{self.consecutive_bad} consecutive non-finite steps",
                                    self.consecutive_bad)
            return GuardVerdict("skip", "non-finite loss or gradient norm", self.consecutive_bad)
        if self.spike_factor > 0 and len(self.recent) == self.recent.maxlen:
            mean = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * mean:
                return GuardVerdict("rollback", f"loss spike {loss:.4g} > {self.spike_factor} x running mean {mean:.4g}", 1)
        self.consecutive_bad = 0
        self.recent.append(loss)
        return GuardVerdict("ok")

    def reset(self) -> None:
        """After a rollback: the restored weights start a fresh history."""
        self.recent.clear()
        self.consecutive_bad = 0
