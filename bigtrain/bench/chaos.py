"""Chaos soak: kill and preempt real training runs at random moments; every run, resumed to
completion, must end bit-identical to an uninterrupted one.

``python -m bigtrain.bench.chaos --trials N [--seed S] [--work DIR]``

Each trial picks a layout (1 process, or 2 ranks under torchrun), synchronous or asynchronous
saves, and one interruption:

* ``kill9@T`` / ``sigterm@T``: SIGKILL or SIGTERM at a random wall-clock time T (to every
  process, as a lost node or a scheduler does, or to one rank only);
* an instrumented point, through ``BIGTRAIN_FAULTS``, at a random save step and rank — inside
  a DCP file write (the background thread for asynchronous saves), after a rank's write and
  before the commit, between the marker and the rename that publishes a checkpoint, while
  pruning an old checkpoint: windows too short to hit by timing.

The interrupted run is then rerun with ``resume=auto`` (no faults) until it exits 0 (a
SIGTERM'd run exits 75 after saving). The trial survives if the final checkpoint verifies, no
temporary is left behind, and the final parameters are bit-identical to those of the
uninterrupted run of the same variant. Prints one line per trial and ``survived k/N``; exits
1 if any trial did not survive. A benchmark command, not part of the test suite (~20 s a trial
on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from bigtrain.config.core import help_text

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "vit" / "digits_test.yaml"
STEPS, EVERY, KEEP = 12, 3, 2  # saves at 3, 6, 9, 12; pruning (keep 2) deletes 3 and 6
COMMON = [f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}", f"checkpoint.keep_last={KEEP}",
          "eval.every_steps=0", "eval.fewshot=false", "log.every_steps=1", "parallel.timeout_s=30",
          "schedule.cooldown_steps=2", "train.num_threads=1"]
VARIANTS = {  # name: (processes, async saves)
    "1proc-sync": (1, False), "1proc-async": (1, True), "2rank-sync": (2, False), "2rank-async": (2, True),
}
POINTS = ["kill_in_write", "kill_in_save", "kill_after_marker", "kill_in_prune"]


@dataclass
class Trial:
    variant: str
    fault: str  # "kill9@time", "sigterm@time" or a BIGTRAIN_FAULTS spec
    delay: float = 0.0  # seconds after start, for the timed faults
    one_rank: bool = False  # timed faults: signal one rank only (2-rank variants)


def command(variant: str, data: Path, run: Path) -> list[str]:
    nproc, asynchronous = VARIANTS[variant]
    args = ["train", str(CONFIG), f"data.dir={data}", f"run.dir={run}", f"checkpoint.async_save={str(asynchronous).lower()}",
            *COMMON]
    if nproc == 1:
        return [sys.executable, "-m", "bigtrain", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "bigtrain",
            *args]


def launch(variant: str, data: Path, run: Path, faults: str = "") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGTRAIN_FAULTS": faults}
    return subprocess.Popen(command(variant, data, run), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return -999, err
    return proc.returncode, err


def _workers(proc: subprocess.Popen) -> list[int]:
    """The training processes: the process itself, or torchrun's worker children."""
    out = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out] or [proc.pid]


def interrupt(trial: Trial, data: Path, run: Path, rng: random.Random) -> tuple[int, str]:
    if not trial.fault.endswith("@time"):
        return finish(launch(trial.variant, data, run, faults=trial.fault))
    proc = launch(trial.variant, data, run)
    deadline = time.monotonic() + trial.delay
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.01)
    if proc.poll() is None:
        sig = signal.SIGKILL if trial.fault.startswith("kill9") else signal.SIGTERM
        if trial.one_rank:
            with_rank = _workers(proc)
            os.kill(rng.choice(with_rank), sig)
        elif sig == signal.SIGKILL:
            os.killpg(proc.pid, sig)  # the whole node is gone
        else:
            for pid in _workers(proc):  # the scheduler signals every task
                os.kill(pid, sig)
    return finish(proc)


def final_params(run: Path) -> dict[str, torch.Tensor]:
    from bigtrain.export import load_model_state

    return load_model_state(str(run / "checkpoints" / f"step_{STEPS:08d}"))  # verifies sizes and checksums first


def run_trial(trial: Trial, data: Path, run: Path, reference: dict[str, torch.Tensor], rng: random.Random) -> tuple[str, bool]:
    """('' if the trial survived, else what went wrong; whether the interruption happened)."""
    rc, err = interrupt(trial, data, run, rng)
    fired = rc != 0
    for _ in range(4):
        if rc == 0:
            break
        rc, err = finish(launch(trial.variant, data, run))
    if rc != 0:
        return f"resume did not complete (exit {rc}): {err.strip().splitlines()[-1] if err.strip() else ''}", fired
    left = [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    if left:
        return f"temporaries left behind: {left}", fired
    try:
        got = final_params(run)
    except Exception as exc:  # a checkpoint that does not verify is exactly what must not happen
        return f"final checkpoint unusable: {exc}", fired
    diff = [k for k in reference if not torch.equal(reference[k], got.get(k, torch.empty(0)))]
    return (f"final parameters differ: {diff[:3]}" if diff else ""), fired


def plan(rng: random.Random, durations: dict[str, float]) -> Trial:
    variant = rng.choice(sorted(VARIANTS))
    nproc = VARIANTS[variant][0]
    kind = rng.choice(["kill9@time", "sigterm@time", *POINTS])
    if kind.endswith("@time"):
        return Trial(variant, kind, delay=rng.uniform(0.2, 1.0) * durations[variant], one_rank=nproc > 1 and rng.random() < 0.5)
    if kind == "kill_in_prune":
        step, rank = rng.choice([EVERY, 2 * EVERY]), 0  # the checkpoints pruning deletes
    elif kind == "kill_after_marker":
        step, rank = rng.choice(range(EVERY, STEPS + 1, EVERY)), 0
    else:
        step, rank = rng.choice(range(EVERY, STEPS + 1, EVERY)), rng.randrange(nproc)
    return Trial(variant, f"{kind}@{step}:{rank}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="working directory (default: a temporary one, removed at the end)")
    ap.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), help="restrict to these variants")
    args = ap.parse_args(argv)
    if args.variants:
        for name in set(VARIANTS) - set(args.variants):
            VARIANTS.pop(name)
    work = Path(args.work or tempfile.mkdtemp(prefix="bigtrain-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    from data_pipeline.writer import write_digits

    data = work / "digits16"
    if not data.exists():
        write_digits(str(data), image_size=16, samples_per_shard=128, seed=0)
    references, durations = {}, {}
    for variant in sorted(VARIANTS):
        run = work / f"reference-{variant}"
        shutil.rmtree(run, ignore_errors=True)
        t0 = time.monotonic()
        rc, err = finish(launch(variant, data, run))
        durations[variant] = time.monotonic() - t0
        if rc != 0:
            print(f"reference run {variant} failed (exit {rc}): {err[-2000:]}", file=sys.stderr)
            return 2
        references[variant] = final_params(run)
        print(f"reference {variant}: {durations[variant]:.1f} s", flush=True)
    rng = random.Random(args.seed)
    survived, interrupted, t_start = 0, 0, time.monotonic()
    for i in range(args.trials):
        trial = plan(rng, durations)
        run = work / f"trial-{i:04d}"
        shutil.rmtree(run, ignore_errors=True)
        problem, fired = run_trial(trial, data, run, references[trial.variant], rng)
        survived += not problem
        interrupted += fired
        detail = f" after {trial.delay:.1f} s" + (" (one rank)" if trial.one_rank else "") if trial.delay else ""
        print(f"trial {i + 1}/{args.trials} {trial.variant} {trial.fault}{detail}: "
              f"{'survived' if not problem else 'FAILED: ' + problem}{'' if fired else ' (ran to the end: the run finished first)'}",
              flush=True)
        if not problem:
            shutil.rmtree(run, ignore_errors=True)
    print(f"survived {survived}/{args.trials} ({interrupted} interrupted, the rest finished before the fault; "
          f"{(time.monotonic() - t_start) / 60:.1f} min)")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if survived == args.trials else 1


if __name__ == "__main__":
    sys.exit(main())
