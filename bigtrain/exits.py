"""Exit codes of the ``bigtrain`` commands and the two training outcomes that map to one.

Kept free of torch: the CLI imports them at start-up (``bigtrain --help`` loads no torch) and
the launchers read the codes to decide whether to resubmit.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_CRASH = 1  # a bug: the traceback is printed
EXIT_BAD_INPUT = 2  # config, data, a checkpoint that is damaged/untrusted/does not fit, a missing package
EXIT_DIVERGED = 3  # the numerical guard gave up (no checkpoint to roll back to, or too many rollbacks)
EXIT_SAVE_FAILED = 4  # a checkpoint that had to be written could not be (disk full, permissions)
EXIT_EVAL_FAILED = 5  # training finished and its final checkpoint is committed, the final evaluation failed
EXIT_REQUEUE = 75  # stopped early (time budget / preemption) after saving: resubmit to continue


class TrainingDiverged(RuntimeError):
    """The numerical guard could not recover (no checkpoint, or rollbacks exhausted)."""


class FinalEvalFailed(RuntimeError):
    """The final evaluation raised; the trained state was committed before it ran."""


__all__ = ["EXIT_BAD_INPUT", "EXIT_CRASH", "EXIT_DIVERGED", "EXIT_EVAL_FAILED", "EXIT_OK", "EXIT_REQUEUE",
           "EXIT_SAVE_FAILED", "FinalEvalFailed", "TrainingDiverged"]
