"""Launch bigtrain through submitit: on a Slurm cluster, or on this machine with ``--local``.

    python -m launch.submit CONFIG [key=value ...] --nodes N --tasks-per-node T
        [--gpus-per-node G] [--cpus-per-task C] [--partition P] [--time MIN]
        [--array SWEEP.yaml] [--max-timeouts K] [--folder DIR] [--local] [--wait]

or from Python: ``jobs = submit(config, overrides, nodes=2, tasks_per_node=8, gpus_per_node=8)``
then ``wait(jobs)`` (the exit status of the final attempt).

One Slurm task per rank (``tasks_per_node`` = processes per node, no torchrun); submitit's
``TorchDistributedEnvironment`` gives each its rank and rendezvous. Preemption and time limits:
submitit sends USR2 to every task ``signal_delay_s`` before the limit; bigtrain's own handler
(installed for the duration of training) sets a flag on each rank, the ranks agree at the next
step, save the DCP checkpoint together and return 75; only then does rank 0 hand over to
submitit, which pickles this job (now with ``resume=auto``) and requeues it, at most
``--max-timeouts`` times for time limits. (submitit's own handler runs on rank 0 only and
cannot save a sharded checkpoint, which needs every rank.)
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from launch.slurm_job import EXIT_BAD_INPUT, EXIT_REQUEUE, deadline_override, job_end_time, resolve_config, runtime_defaults

try:
    import submitit
except ImportError:  # the launcher is optional: pip install 'bigtrain[submitit]'
    submitit = None


class SubmitError(Exception):
    """Bad input to the submitter: one line on stderr, exit 2, nothing submitted."""


class TrainJob:
    """``bigtrain train CONFIG overrides`` as a submitit callable, one instance per task.

    Checkpointable (submitit requeues what ``checkpoint`` returns): the training state lives in
    the DCP checkpoint under run.dir, so the object only carries the command, set to
    ``resume=auto`` for every later attempt."""

    def __init__(self, config: str, overrides: list[str]) -> None:
        self.config, self.overrides = config, list(overrides)

    def __call__(self) -> int:
        os.environ.update(runtime_defaults())  # before torch is imported: OMP_NUM_THREADS counts then
        from bigtrain.cli import main as bigtrain_main

        dist_env = submitit.helpers.TorchDistributedEnvironment()
        # overwrite: sbatch passes the submitter's environment on, and a stale RANK or MASTER_PORT
        # there must not win; the GPUs are left as Slurm bound them (LOCAL_RANK picks one).
        dist_env.export(set_cuda_visible_devices=False, overwrite=True)
        # submitit's checkpoint-and-requeue handler, installed before this call; bigtrain replaces
        # it while training and calls it once all ranks have saved.
        requeue = signal.getsignal(submitit.JobEnvironment._usr_sig())
        faulthandler.enable()  # a hung or crashed rank prints its Python stack
        end = job_end_time() if os.environ.get("SLURM_JOB_ID") else None
        overrides = [*self.overrides, *deadline_override(self.overrides, end)]
        status = bigtrain_main(["train", self.config, *overrides])
        if status != EXIT_REQUEUE or not callable(requeue):
            return status
        if dist_env.rank != 0:
            # Rank 0 requeues. Leaving with 0 (not 75) keeps srun --kill-on-bad-exit from killing
            # rank 0 before it has; no result file, so the job is not reported finished.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        try:
            requeue(submitit.JobEnvironment._usr_sig(), None)  # pickles checkpoint(), requeues, exits
        except submitit.core.utils.UncompletedJobError as exc:
            print(f"[launch.submit] not requeued: {exc}", flush=True)
        return status  # 75: saved, not requeued (timeout cap reached): resubmit to continue

    def checkpoint(self) -> Any:
        """What submitit requeues: the same command, resuming from the newest checkpoint."""
        keep = [o for o in self.overrides if not o.startswith("resume=")]
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, [*keep, "resume=auto"]))


def sweep_points(path: str) -> list[list[str]]:
    """A sweep file: a list of points (each a list of ``key=value`` strings or a mapping), or a
    mapping of key -> list of values (their cartesian product)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise SubmitError(f"sweep file {path}: {exc}") from None

    def point(item: Any, where: str) -> list[str]:
        if isinstance(item, dict):
            return [f"{k}={_yaml_value(v)}" for k, v in item.items()]
        if isinstance(item, list) and all(isinstance(s, str) and "=" in s for s in item):
            return list(item)
        raise SubmitError(f"sweep file {path}: {where} is neither a mapping nor a list of key=value strings")

    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        keys = list(data)
        return [[f"{k}={_yaml_value(v)}" for k, v in zip(keys, combo)] for combo in itertools.product(*data.values())]
    if isinstance(data, list) and data:
        return [point(item, f"point {i}") for i, item in enumerate(data)]
    raise SubmitError(f"sweep file {path}: expected a non-empty list of points or a mapping key -> [values]")


def _yaml_value(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip()


def plan(config: str, overrides: list[str], sweep: str | None) -> list[list[str]]:
    """The override list of every job, each validated now (a bad key fails before submitting).
    Sweep points get their own run.dir (``<run.dir>/<index>-<point>``) unless they set one, so
    they never resume each other's checkpoints."""
    from bigtrain.checkpoint import CheckpointError
    from bigtrain.cli import check_before_work
    from bigtrain.config import ConfigError, load_config

    try:
        base = load_config(config, overrides)
        check_before_work(base)  # a resume=/init= checkpoint that cannot load fails here, not in the job
        if sweep is None:
            return [list(overrides)]
        jobs = []
        for i, point in enumerate(sweep_points(sweep)):
            extra = list(point)
            if not any(o.startswith("run.dir=") for o in point):
                slug = re.sub(r"[^A-Za-z0-9.=_-]+", "_", ",".join(point))[:80]
                extra.append(f"run.dir={os.path.join(base.run.dir, f'{i}-{slug}')}")
            check_before_work(load_config(config, [*overrides, *extra]))
            jobs.append([*overrides, *extra])
        return jobs
    except (ConfigError, CheckpointError) as exc:
        raise SubmitError(str(exc)) from None


def submit(config: str, overrides: list[str] | None = None, *, nodes: int = 1, tasks_per_node: int = 1,
           gpus_per_node: int = 0, cpus_per_task: int = 1, partition: str = "", time_min: float = 60,
           sweep: str | None = None, max_timeouts: int = 3, folder: str | None = None, local: bool = False,
           signal_delay_s: int = 90, name: str = "bigtrain", sbatch: dict[str, str] | None = None) -> list[Any]:
    """Submit one job (or one per sweep point, as a Slurm job array); returns submitit jobs.
    ``sbatch``: further ``#SBATCH --key=value`` options (account, qos, constraint, mem...)."""
    if submitit is None:
        raise SubmitError("launch.submit needs submitit (pip install 'bigtrain[submitit]')")
    if local and nodes > 1:
        raise SubmitError("--local runs on this one machine: --nodes must be 1")
    if not local and shutil.which("sbatch") is None:
        raise SubmitError("no sbatch on this machine's PATH: submit from a Slurm login node, or use --local")
    config = resolve_config(config)
    job_overrides = plan(config, list(overrides or []), sweep)
    if folder is None:
        from bigtrain.config import load_config

        folder = os.path.join(load_config(config, list(overrides or [])).run.dir, "submitit")
    try:
        os.makedirs(folder, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder)
        probe.close()
    except OSError as exc:
        raise SubmitError(f"--folder {folder}: not writable ({exc.strerror})") from None
    cluster = "local" if local else "slurm"
    if local:
        executor = submitit.LocalExecutor(folder=folder, max_num_timeout=max_timeouts)
        executor.update_parameters(timeout_min=time_min, nodes=1, tasks_per_node=tasks_per_node,
                                   gpus_per_node=gpus_per_node, signal_delay_s=signal_delay_s)
    else:
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_timeouts)
        executor.update_parameters(
            job_name=name, time=max(1, round(time_min)), nodes=nodes, ntasks_per_node=tasks_per_node,
            cpus_per_task=cpus_per_task, signal_delay_s=signal_delay_s, srun_args=["--kill-on-bad-exit=1"],
            additional_parameters={"requeue": True, **(sbatch or {})},
            **({"gpus_per_node": gpus_per_node} if gpus_per_node else {}),
            **({"partition": partition} if partition else {}))
    with _submission_env():
        fns = [TrainJob(config, o) for o in job_overrides]
        try:
            jobs = executor.submit_array(fns) if sweep is not None else [executor.submit(fns[0])]
        except Exception as exc:  # noqa: BLE001 - submitit wraps sbatch's refusal (unknown partition, ...)
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            raise SubmitError(f"the cluster refused the job: {lines[-1] if lines else type(exc).__name__}") from None
    for job, o in zip(jobs, job_overrides):
        print(f"submitted {cluster} job {job.job_id}: {nodes} node(s) x {tasks_per_node} task(s), "
              f"log {job.paths.stdout}" + (f", overrides {' '.join(o)}" if o else ""), flush=True)
    return jobs


@contextlib.contextmanager
def _submission_env() -> Iterator[None]:
    """sbatch hands the submitter's environment to the job: a submitter that is itself a Slurm
    job or a torchrun rank must not pass its SLURM_JOB_ID, RANK, MASTER_PORT... on. Unlike
    submitit's clean_env, SLURM_CONF (which cluster to talk to) stays."""
    drop = [k for k in os.environ if (k.startswith(("SLURM_", "SUBMITIT_")) and k != "SLURM_CONF")
            or k in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")]
    saved = {k: os.environ.pop(k) for k in drop}
    try:
        yield
    finally:
        os.environ.update(saved)


def _slurm_state(job_id: str) -> str:
    """The job's state from squeue ('' once Slurm forgot it); no accounting database needed."""
    try:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "UNKNOWN"
    return out.stdout.strip().splitlines()[0] if out.stdout.strip() else ""


ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "RESIZING", "SUSPENDED", "REQUEUE_HOLD",
          "REQUEUE_FED", "SIGNALING", "STAGE_OUT", "UNKNOWN"}


def wait(jobs: list[Any], poll_s: float = 2.0) -> int:
    """Block until every job has ended (requeues included); returns the highest final exit
    status: the value bigtrain returned in the final attempt, or 1 for a job that ended without
    one (killed, crashed outside training)."""
    status = 0
    for job in jobs:
        while not job.done():
            if job.__class__.__name__ == "SlurmJob" and _slurm_state(job.job_id) not in ACTIVE:
                time.sleep(poll_s)  # the result file may land just after the job leaves the queue
                break
            time.sleep(poll_s)
        try:
            # Rank 0's value: every rank returns the same status, except after a stop that is not
            # requeued (timeout cap), when the other ranks have left without a result.
            code = job.task(0).result()
            code = int(code) if isinstance(code, int) else 0
        except Exception as exc:  # noqa: BLE001 - submitit re-raises the job's failure of any type
            print(f"job {job.job_id} failed: {str(exc).strip().splitlines()[-1] if str(exc).strip() else exc}",
                  flush=True)
            code = 1
        print(f"job {job.job_id} ended with status {code}", flush=True)
        status = max(status, code)
    return status


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.submit", description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="training processes per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=1)
    p.add_argument("--partition", default="")
    p.add_argument("--time", type=int, default=60, help="time limit in minutes (USR2 comes --signal-delay s before)")
    p.add_argument("--signal-delay", type=int, default=90, help="seconds before the limit that USR2 is sent")
    p.add_argument("--array", metavar="SWEEP.yaml", help="one job per sweep point, as a job array")
    p.add_argument("--max-timeouts", type=int, default=3, help="requeues after a time limit before giving up")
    p.add_argument("--folder", help="submitit's folder for pickles and logs (default: RUN_DIR/submitit)")
    p.add_argument("--sbatch", action="append", default=[], metavar="KEY=VALUE",
                   help="another #SBATCH option, e.g. --sbatch account=proj --sbatch qos=high (repeatable)")
    p.add_argument("--local", action="store_true", help="run on this machine through submitit's local executor")
    p.add_argument("--wait", action="store_true", help="block until the job(s) end; exit with the final status")
    args = p.parse_intermixed_args(argv)
    try:
        for flag, value, low in (("--nodes", args.nodes, 1), ("--tasks-per-node", args.tasks_per_node, 1),
                                 ("--cpus-per-task", args.cpus_per_task, 1), ("--time", args.time, 1),
                                 ("--gpus-per-node", args.gpus_per_node, 0), ("--signal-delay", args.signal_delay, 0),
                                 ("--max-timeouts", args.max_timeouts, 0)):
            if value < low:
                raise SubmitError(f"{flag} {value}: must be at least {low}")
        if args.signal_delay >= args.time * 60:
            raise SubmitError(f"--signal-delay {args.signal_delay}: must be shorter than --time ({args.time} min)")
        if any("=" not in kv for kv in args.sbatch):
            raise SubmitError("--sbatch takes KEY=VALUE (an sbatch long option without its dashes)")
        sbatch = dict(kv.split("=", 1) for kv in args.sbatch)
        jobs = submit(args.config, args.overrides, nodes=args.nodes, tasks_per_node=args.tasks_per_node,
                      gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task, partition=args.partition,
                      time_min=args.time, sweep=args.array, max_timeouts=args.max_timeouts, folder=args.folder,
                      local=args.local, signal_delay_s=args.signal_delay, sbatch=sbatch)
    except SubmitError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    return wait(jobs) if args.wait else 0


if __name__ == "__main__":
    sys.exit(main())
