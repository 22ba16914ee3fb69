"""The batch side of ``sbatch slurm/*.sh``: checks the config, starts one Slurm task per training
process with ``srun``, and requeues the job when training stopped to be continued.

``python -m launch.slurm_job CONFIG [key=value ...]`` inside a Slurm batch job (the sbatch
scripts end with it; ``--dry-run`` prints what it would run, outside Slurm too).

Why one task per rank and no torchrun: a Slurm signal (``--signal``, time limit, ``scancel``)
then reaches every training process directly, and a rank's exit code is the step's. Under
``srun torchrun`` the agent handles SIGTERM itself and kills its workers, and USR1/USR2 kill
the agent (README of slurm/).

What happens after ``srun`` returns (exit code of the step = the highest of its tasks):

* 0: done.
* 75 (bigtrain saved and stopped: preemption signal, time budget, deadline): ``scontrol requeue``
  while ``SLURM_RESTART_COUNT`` < ``BIGTRAIN_MAX_REQUEUES``; the batch script restarts from the
  top and training resumes from the checkpoint (``resume=auto``).
* 2 (bad input: config, data, checkpoint): never requeued; the same input would fail again.
* anything else (a crash, a killed rank): requeued while ``SLURM_RESTART_COUNT`` <
  ``BIGTRAIN_CRASH_REQUEUES`` (default 0: a crash ends the job, the checkpoint stays as it was).

A cancelled job (``scancel``) is not requeued even if training answered its SIGTERM with 75.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import NoReturn

EXIT_REQUEUE = 75  # bigtrain.trainer.EXIT_REQUEUE (the batch side needs nothing else of the trainer)
EXIT_BAD_INPUT = 2
REPO = Path(__file__).resolve().parents[1]
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2)  # to the tasks, through srun, when sent to the batch shell only


def say(msg: str) -> None:
    print(f"[bigtrain slurm_job {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def bad_input(msg: str) -> NoReturn:
    """One line on stderr and exit 2 (never requeued: the same input would fail again)."""
    print(f"error: {msg}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_BAD_INPUT)


def env_int(name: str, default: int, low: int = 0) -> int:
    value = os.environ.get(name, "")
    try:
        number = int(value) if value else default
    except ValueError:
        bad_input(f"environment variable {name}={value!r} is not an integer")
    if number < low:
        bad_input(f"environment variable {name}={value!r} must be >= {low}")
    return number


def env_words(name: str) -> list[str]:
    """A shell-quoted environment variable split into words (BIGTRAIN_OVERRIDES, BIGTRAIN_SRUN_ARGS)."""
    try:
        return shlex.split(os.environ.get(name, ""))
    except ValueError as exc:
        bad_input(f"environment variable {name}: {exc} (check its quotes)")


def resolve_config(path: str) -> str:
    """CONFIG relative to the submit directory, else to this checkout (sbatch runs a copy of the
    script from Slurm's spool directory, so the script's own location says nothing)."""
    for base in (Path.cwd(), REPO):
        candidate = base / path
        if candidate.is_file():
            return str(candidate)
    bad_input(f"config file {path!r} not found (in {Path.cwd()} or {REPO})")


def check_config(config: str, overrides: list[str]) -> None:
    """The whole config, validated here once (~2 s: the family registry imports torch) instead of
    by every rank after the allocation started them: a typo exits 2 with a one-line reason and is
    never requeued."""
    from bigtrain.checkpoint import CheckpointError
    from bigtrain.cli import check_before_work
    from bigtrain.config import ConfigError, load_config

    try:
        check_before_work(load_config(config, overrides))  # also: a resume=/init= checkpoint that cannot load
    except (ConfigError, CheckpointError) as exc:
        say(f"error: {exc}")
        raise SystemExit(EXIT_BAD_INPUT) from None


def job_end_time() -> float | None:
    """The job's end (Unix time) from ``SLURM_JOB_END_TIME`` (Slurm >= 23.02) or ``squeue``;
    None for no limit or when it cannot be read."""
    if os.environ.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(os.environ["SLURM_JOB_END_TIME"])
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%e"], capture_output=True, text=True, timeout=30)
        return _dt.datetime.fromisoformat(out.stdout.strip()).timestamp()  # squeue prints local time
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None  # "N/A", "NONE" (no limit) or no squeue


def has_gpus() -> bool:
    return bool(os.environ.get("SLURM_GPUS_ON_NODE", "0") not in ("", "0") or os.environ.get("SLURM_JOB_GPUS")
                or os.environ.get("SLURM_GPUS_PER_NODE"))


def runtime_defaults() -> dict[str, str]:
    """Environment a training process wants and the user did not set: one intra-op thread per
    CPU Slurm gave the task (torch would take every core of the node, once per rank), Python
    stacks on a crash, and the NCCL settings when the job has GPUs."""
    env = {"OMP_NUM_THREADS": os.environ.get("SLURM_CPUS_PER_TASK", "1"),
           "PYTHONFAULTHANDLER": "1", "PYTHONUNBUFFERED": "1"}
    if has_gpus():
        # Fail a broken collective within the process-group timeout instead of hanging; keep
        # NCCL quiet unless asked; no record_stream bookkeeping (FSDP2 does not need it).
        env.update(TORCH_NCCL_ASYNC_ERROR_HANDLING="3", NCCL_DEBUG="WARN", TORCH_NCCL_AVOID_RECORD_STREAMS="1")
    return {k: v for k, v in env.items() if k not in os.environ}


def task_environment() -> dict[str, str]:
    """Rendezvous and runtime environment for the ranks (srun passes the batch environment on)."""
    env = dict(os.environ)
    for stale in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):  # a submitter's torchrun variables
        env.pop(stale, None)  # would override the per-task SLURM_PROCID / SLURM_LOCALID
    from bigtrain.distributed.mesh import first_host  # what the ranks themselves would pick

    env.setdefault("MASTER_ADDR", first_host(os.environ.get("SLURM_JOB_NODELIST", ""))
                   or os.environ.get("SLURMD_NODENAME", "127.0.0.1"))
    # One port per job id: jobs sharing a node do not collide, and a requeued job keeps its port.
    env.setdefault("MASTER_PORT", str(20000 + env_int("SLURM_JOB_ID", 0) % 20000))
    env.update(runtime_defaults())
    return env


def deadline_override(overrides: list[str], end: float | None) -> list[str]:
    """``train.deadline`` = the job's end minus ``BIGTRAIN_DEADLINE_MARGIN_S`` (teardown and
    slack; the trainer adds its measured step and save times), unless the user set one."""
    if end is None or any(o.startswith("train.deadline=") for o in overrides):
        return []
    return [f"train.deadline={end - env_int('BIGTRAIN_DEADLINE_MARGIN_S', 60):.0f}"]


def training_overrides(overrides: list[str], end: float | None) -> list[str]:
    """The user's overrides plus what the job itself decides: on a restart always ``resume=auto``
    (a ``resume=PATH`` would start a new branch from the same checkpoint on every restart), and
    the deadline."""
    restart = ["resume=auto"] if env_int("SLURM_RESTART_COUNT", 0) > 0 else []
    return [*overrides, *restart, *deadline_override(overrides, end)]


def srun_command(config: str, overrides: list[str]) -> list[str]:
    python = os.environ.get("BIGTRAIN_PYTHON") or sys.executable
    # -K1: one rank dying (crash, kill -9, OOM) ends the step at once instead of leaving the others
    # in a collective until the process-group timeout. --wait bounds a step whose tasks end
    # unevenly for any other reason.
    return ["srun", "--kill-on-bad-exit=1", "--wait=60", "--unbuffered",
            *env_words("BIGTRAIN_SRUN_ARGS"),
            python, "-u", "-m", "bigtrain", "train", config, *overrides]


class BatchSignals:
    """The batch shell's signals: SIGTERM (time limit, scancel) is noted, not obeyed, so the
    requeue decision still runs once srun returns; USR1/USR2 sent to the batch shell alone
    (``--signal=B:...``, ``scancel --batch``) are passed on to the tasks through srun."""

    def __init__(self) -> None:
        self.srun: subprocess.Popen | None = None
        signal.signal(signal.SIGTERM, self._term)
        for sig in FORWARDED:
            signal.signal(sig, self._forward)

    def _term(self, signum: int, frame: FrameType | None) -> None:
        say("batch shell got SIGTERM (time limit, scancel or requeue): waiting for srun to return")

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        say(f"got {signal.Signals(signum).name}: passing it to the training processes")
        if self.srun is not None and self.srun.poll() is None:
            self.srun.send_signal(signum)


def cancelled(job: str) -> bool:
    """Whether Slurm is ending this job on someone's order (``scancel``, or ``scontrol requeue``,
    after which Slurm requeues it itself): it is then COMPLETING with no reason. A time limit reads
    Reason=TimeLimit and is worth a requeue; ``scancel --signal`` leaves the job RUNNING. A
    cancelled job must stay cancelled even though its ranks saved and answered the SIGTERM with
    75: ``scontrol requeue`` would bring it back."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    fields = dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)
    state, reason = fields.get("JobState", ""), fields.get("Reason", "None")
    return state in ("COMPLETING", "CANCELLED") and reason in ("None", "")


def requeue_target() -> str:
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def after_step(rc: int) -> int:
    """Requeue or not, from srun's exit code; returns the batch script's exit code."""
    restarts = env_int("SLURM_RESTART_COUNT", 0)
    if rc == 0:
        say("training finished")
        return 0
    if rc == EXIT_BAD_INPUT:
        say("bad input (exit 2): not requeued, the same input would fail again")
        return rc
    cap = env_int("BIGTRAIN_MAX_REQUEUES", 20) if rc == EXIT_REQUEUE else env_int("BIGTRAIN_CRASH_REQUEUES", 0)
    what = "saved and stopped (exit 75)" if rc == EXIT_REQUEUE else f"failed (exit {rc})"
    if restarts >= cap:
        knob = "BIGTRAIN_MAX_REQUEUES" if rc == EXIT_REQUEUE else "BIGTRAIN_CRASH_REQUEUES"
        say(f"training {what}; not requeued: {restarts} restarts already ({knob}={cap})")
        return rc
    target = requeue_target()
    if cancelled(target):
        say(f"training {what}; Slurm is ending the job (scancel, or scontrol requeue: then Slurm requeues it)")
        return rc
    say(f"training {what}; requeue {restarts + 1}/{cap}: scontrol requeue {target}")
    out = subprocess.run(["scontrol", "requeue", target], capture_output=True, text=True)
    if out.returncode != 0:
        say(f"scontrol requeue failed: {out.stderr.strip() or out.stdout.strip()}")
    return rc


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default=os.environ.get("BIGTRAIN_CONFIG"),
                        help="config file (or $BIGTRAIN_CONFIG)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (after those in $BIGTRAIN_OVERRIDES)")
    parser.add_argument("--dry-run", action="store_true", help="print the srun command and environment, run nothing")
    args = parser.parse_args(argv)
    if not args.config:
        parser.error("no config: pass CONFIG or set BIGTRAIN_CONFIG")
    config = resolve_config(args.config)
    overrides = [*env_words("BIGTRAIN_OVERRIDES"), *args.overrides]
    for knob, default in (("BIGTRAIN_MAX_REQUEUES", 20), ("BIGTRAIN_CRASH_REQUEUES", 0)):
        env_int(knob, default)  # read again after the step; a bad value must fail now, not after a stop
    end = job_end_time()
    effective = training_overrides(overrides, end)  # a restart's resume=auto supersedes a resume=PATH
    check_config(config, effective)
    cmd = srun_command(config, effective)
    env = task_environment()
    job = os.environ.get("SLURM_JOB_ID", "-")
    say(f"job {job} restart {env_int('SLURM_RESTART_COUNT', 0)} on {os.environ.get('SLURM_JOB_NODELIST', '-')}: "
        f"{os.environ.get('SLURM_NTASKS', '1')} ranks, rendezvous {env['MASTER_ADDR']}:{env['MASTER_PORT']}, "
        f"ends {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(end)) if end else 'without a limit'}")
    say("run: " + shlex.join(cmd))
    if args.dry_run:
        return 0
    if "SLURM_JOB_ID" not in os.environ:
        say("error: not inside a Slurm job (submit with sbatch; --dry-run shows the command)")
        return EXIT_BAD_INPUT
    signals = BatchSignals()
    signals.srun = subprocess.Popen(cmd, env=env)
    rc = signals.srun.wait()
    if rc < 0:  # srun itself killed by a signal
        rc = 128 - rc
    return after_step(rc)


if __name__ == "__main__":
    sys.exit(main())
