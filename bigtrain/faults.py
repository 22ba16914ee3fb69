"""Fault injection for testing the recovery paths (crash during a save, NaN or spiking loss).

Off unless the environment variable ``BIGTRAIN_FAULTS`` is set, e.g.::

    BIGTRAIN_FAULTS="nan_loss@5,nan_loss@6"      the loss of steps 5 and 6 becomes NaN
    BIGTRAIN_FAULTS="loss_scale@7"               the loss of step 7 is multiplied by 1000
    BIGTRAIN_FAULTS="kill_in_save@20:1"          rank 1 SIGKILLs itself after writing its shard
                                                  of the step-20 checkpoint, before the commit
                                                  (asynchronous saves: once every rank's write is done)
    BIGTRAIN_FAULTS="kill_in_write@20:1"         rank 1 SIGKILLs itself inside a DCP file write of the
                                                  step-20 checkpoint (the background thread for async saves)
    BIGTRAIN_FAULTS="enospc_in_write@20"         a write of the step-20 checkpoint fails with ENOSPC
    BIGTRAIN_FAULTS="kill_after_marker@20"       rank 0 SIGKILLs itself after writing the marker, before
                                                  the rename that publishes the checkpoint
    BIGTRAIN_FAULTS="kill_in_prune@4"            rank 0 SIGKILLs itself while deleting the step-4 checkpoint
    BIGTRAIN_FAULTS="sigterm_in_eval@12"         the evaluation at step 12 starts with a SIGTERM to this process
    BIGTRAIN_FAULTS="raise_in_eval@12"           the evaluation at step 12 raises RuntimeError

Steps are the 0-based index of the step being computed (``trainer.state.step``), or
for saves the step number of the checkpoint. Each fault fires once per process, so a
rolled-back step runs clean the second time. Real failures are what is injected: a real
SIGKILL, a real non-finite loss flowing through backward.
"""

from __future__ import annotations

import errno
import os
import signal

_fired: set[str] = set()


def _spec() -> list[tuple[str, int, int | None]]:
    out: list[tuple[str, int, int | None]] = []
    for item in filter(None, (s.strip() for s in os.environ.get("BIGTRAIN_FAULTS", "").split(","))):
        name, _, rest = item.partition("@")
        step, _, rank = rest.partition(":")
        out.append((name, int(step), int(rank) if rank else None))
    return out


def fires(name: str, step: int, rank: int = 0) -> bool:
    """True once if fault ``name`` is configured for ``step`` (and this rank)."""
    for fname, fstep, frank in _spec():
        key = f"{fname}@{fstep}:{frank}"
        if fname == name and fstep == step and frank in (None, rank) and key not in _fired:
            _fired.add(key)
            return True
    return False


def maybe_kill(name: str, step: int, rank: int) -> None:
    if fires(name, step, rank):
        os.kill(os.getpid(), signal.SIGKILL)


def in_checkpoint_write(step: int, rank: int) -> None:
    """Called before every write into a checkpoint file: a kill or a full disk right there."""
    if not os.environ.get("BIGTRAIN_FAULTS"):
        return
    maybe_kill("kill_in_write", step, rank)
    if fires("enospc_in_write", step, rank):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC) + " (injected)")


def in_evaluate(step: int, rank: int) -> None:
    """Called as an evaluation starts: a preemption signal or a crash right there."""
    if not os.environ.get("BIGTRAIN_FAULTS"):
        return
    if fires("sigterm_in_eval", step, rank):
        os.kill(os.getpid(), signal.SIGTERM)
    if fires("raise_in_eval", step, rank):
        raise RuntimeError(f"injected failure in the evaluation at step {step}")
