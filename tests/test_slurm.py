"""Launching on a real Slurm (two slurmd nodes on loopback, started by the ``slurm_cluster``
fixture): ``sbatch slurm/llm.sh``, preemption and requeue, a killed rank, the retry cap, and
submitit (on Slurm and with its local executor). gloo, the tiny causal-LM config.

Parity with one process uses the tolerance of the parity tests (docs/parallelism.md): per-step loss within
1e-5 relative, ||P - P_ref|| / ||P_ref - P_0|| <= 2e-5. Interrupted-and-resumed runs of the same
layout must be bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from conftest import ROOT
from test_resume import model_params, train_records

pytestmark = pytest.mark.slurm
LM_CONFIG = "configs/llm/stdlib_test.yaml"
STEPS, EVERY = 150, 30
COMMON = ["eval.every_steps=0", "eval.final=false", "log.progress=false", "log.every_steps=1",
          "checkpoint.keep_last=0", "parallel.timeout_s=60", f"train.steps={STEPS}", f"checkpoint.every_steps={EVERY}"]


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "BIGTRAIN_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **extra}


def sbatch(sbatch_args: list[str], script: str, args: list[str], **env: str) -> str:
    out = subprocess.run(["sbatch", "--parsable", *sbatch_args, script, *args], cwd=ROOT, env=job_env(**env),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=30)
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def in_queue(job: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    return bool(out.stdout.strip())


def wait_until(cond: Callable[[], bool], timeout: float, what: str, poll: float = 0.2) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def finish(job: str, log: Path, timeout: float = 300) -> dict[str, str]:
    """Wait for the job to leave the queue; its final scontrol record."""
    try:
        wait_until(lambda: not in_queue(job), timeout, f"job {job} to end")
    except AssertionError:
        subprocess.run(["scancel", job])
        raise AssertionError(log.read_text()[-3000:] if log.exists() else f"job {job}: no log") from None
    return job_info(job)


def lm_job(tmp: Path, name: str, data: str, sbatch_args: list[str], *extra: str, **env: str) -> tuple[str, Path, Path]:
    run, log = tmp / name, tmp / f"{name}.out"
    job = sbatch(["-N2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", f"--output={log}", *sbatch_args],
                 "slurm/llm.sh", [LM_CONFIG, f"data.dir={data}", f"run.dir={run}", *COMMON, *extra], **env)
    return job, run, log


def checkpoint(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}"


def assert_bit_identical(run: Path, reference: Path) -> None:
    ref, got = train_records(reference), train_records(run)
    assert sorted(got) == sorted(ref) == list(range(1, STEPS + 1))
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    a, b = model_params(checkpoint(run, STEPS)), model_params(checkpoint(reference, STEPS))
    assert a.keys() == b.keys()
    for name in b:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster: dict, lm_data_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``sbatch -N2 slurm/llm.sh``, uninterrupted: the reference of every resume test here."""
    tmp = tmp_path_factory.mktemp("sbatch_ref")
    job, run, log = lm_job(tmp, "run", lm_data_dir, [])
    info = finish(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-3000:]
    text = log.read_text()
    assert "2 ranks, rendezvous 127.0.0.1:" in text and "training finished" in text
    return run


def test_sbatch_two_nodes_matches_one_process(slurm_cluster: dict, lm_data_dir: str, tmp_path: Path) -> None:
    """Parity over 20 steps (fp32 reduction-order differences grow chaotically over longer runs:
    measured 1.2e-7 loss difference up to step 20, 4e-5 by step 50, 1.4e-4 by step 150)."""
    steps = ["train.steps=20", "checkpoint.every_steps=0"]
    job, run, log = lm_job(tmp_path, "run", lm_data_dir, [], *steps)
    ref = tmp_path / "ref.pt"
    overrides = [f"data.dir={lm_data_dir}", *COMMON, *steps]
    subprocess.run([sys.executable, "-m", "bigtrain.tools.parity", "--config", LM_CONFIG,
                    *[x for o in overrides for x in ("--override", o)], "--workdir", str(tmp_path / "single"),
                    "--reference", str(ref)], check=True, env=job_env(), cwd=ROOT, timeout=300, capture_output=True)
    info = finish(job, log)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log.read_text()[-3000:]
    assert "2 ranks, rendezvous 127.0.0.1:" in log.read_text()
    single = torch.load(ref, weights_only=False)
    records = train_records(run)
    losses = [records[s]["loss"] for s in range(1, 21)]
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, single["losses"], strict=True))
    assert worst <= 1e-5, worst
    final, p0, p1 = model_params(checkpoint(run, 20)), single["initial"], single["params"]
    num = sum(float((final[k] - p1[k]).double().pow(2).sum()) for k in p1)
    den = sum(float((p1[k] - p0[k]).double().pow(2).sum()) for k in p1)
    print(f"sbatch 2 nodes vs 1 process, 20 steps: loss rel diff {worst:.2e}, param rel diff {(num / den) ** 0.5:.2e}")
    assert (num / den) ** 0.5 <= 2e-5, (num / den) ** 0.5


def test_preempted_and_requeued_job_resumes_bit_exactly(two_node_run: Path, lm_data_dir: str, tmp_path: Path) -> None:
    """A signal (what --signal sends before the time limit) makes the ranks save and exit 75 and
    the batch side requeue; then an operator's ``scontrol requeue`` (SIGTERM: save, Slurm
    requeues). Two restarts, final parameters bit-identical to the uninterrupted run."""
    job, run, log = lm_job(tmp_path, "run", lm_data_dir, [])
    wait_until(lambda: checkpoint(run, EVERY).exists(), 120, "the first checkpoint")
    subprocess.run(["scancel", "--signal=USR2", job], check=True)
    wait_until(lambda: "resumed from" in log.read_text(), 120, "the first resume")
    subprocess.run(["scontrol", "requeue", job], check=True)
    wait_until(lambda: log.read_text().count("resumed from") == 2, 120, "the second resume")
    info = finish(job, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", text[-3000:]
    assert "signal SIGUSR2 at step" in text and "signal SIGTERM at step" in text
    assert "requeue 1/20: scontrol requeue" in text  # ours; the second one is Slurm's own
    assert re.search(r"job \d+ restart 2 on", text)
    stops = [int(s) for s in re.findall(r"at step (\d+): saving and stopping", text)]
    assert len(set(stops)) == 2 and all(EVERY <= s < STEPS for s in stops), stops
    assert_bit_identical(run, two_node_run)


def test_job_that_keeps_stopping_ends_at_the_requeue_cap(slurm_cluster: dict, lm_data_dir: str, tmp_path: Path) -> None:
    # train.max_minutes ~ 0: every attempt saves after one step and exits 75
    job, run, log = lm_job(tmp_path, "run", lm_data_dir, [], "train.max_minutes=0.0001", BIGTRAIN_MAX_REQUEUES="1")
    info = finish(job, log, timeout=240)
    text = log.read_text()
    assert info["Restarts"] == "1" and info["ExitCode"] == "75:0", text[-3000:]
    assert "requeue 1/1: scontrol requeue" in text and "not requeued: 1 restarts already (BIGTRAIN_MAX_REQUEUES=1)" in text
    assert sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*")) == [1, 2]


def test_bad_config_fails_before_srun_and_is_not_requeued(slurm_cluster: dict, lm_data_dir: str, tmp_path: Path) -> None:
    job, run, log = lm_job(tmp_path, "run", lm_data_dir, [], "train.stepz=3")
    info = finish(job, log, timeout=60)
    text = log.read_text()
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", text
    assert "unknown config key 'train.stepz'" in text and "run: srun" not in text


def _rank_pid(job: str, rank: int) -> int | None:
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"bigtrain" in cmd and b"train" in cmd and f"SLURM_JOB_ID={job}".encode() in env \
                and f"SLURM_PROCID={rank}".encode() in env and b"-m\0bigtrain\0" in cmd:
            return int(pid)
    return None


def test_kill9_of_one_rank_ends_the_job_and_keeps_the_checkpoint(slurm_cluster: dict, lm_data_dir: str,
                                                                  tmp_path: Path) -> None:
    from bigtrain.checkpoint import check_loadable

    job, run, log = lm_job(tmp_path, "run", lm_data_dir, [], "train.steps=100000")
    wait_until(lambda: checkpoint(run, EVERY).exists(), 120, "the first checkpoint")
    pid = _rank_pid(job, 1)
    assert pid is not None
    t0 = time.monotonic()
    os.kill(pid, 9)
    info = finish(job, log, timeout=60)
    took = time.monotonic() - t0
    assert took < 20, f"the job outlived its killed rank by {took:.1f} s"
    assert info["JobState"] == "FAILED" and info["ExitCode"] != "0:0" and info["Restarts"] == "0", log.read_text()
    saved = sorted((run / "checkpoints").glob("step_*"))
    assert saved, "no checkpoint"
    check_loadable(str(saved[-1]))  # the newest one verifies (a kill mid-save leaves no partial step_*)


@pytest.mark.slow
def test_time_limit_stops_saves_and_requeues(slurm_cluster: dict, lm_data_dir: str, tmp_path: Path) -> None:
    """A real one-minute limit and no signal (--signal=URG is ignored; Slurm sends --signal up to
    60 s early, which for a one-minute job is any time): train.deadline, from squeue's end time,
    stops the run before Slurm kills it; it saves, exits 75, is requeued, resumes, hits the cap."""
    job, run, log = lm_job(tmp_path, "run", lm_data_dir, ["--time=1", "--signal=URG@1"], "train.steps=100000",
                           BIGTRAIN_MAX_REQUEUES="1", BIGTRAIN_DEADLINE_MARGIN_S="10")
    info = finish(job, log, timeout=400)
    text = log.read_text()
    assert info["Restarts"] == "1" and info["ExitCode"] == "75:0", text[-3000:]
    assert "DUE TO TIME LIMIT" not in text, "stopped by Slurm, not by bigtrain"
    assert text.count("saved and stopped (exit 75)") == 2 and "resumed from" in text
    assert len(re.findall(r"train\.deadline=\d+ at step \d+: saving and stopping", text)) >= 2


# --- submitit -----------------------------------------------------------------------------------
def _submitit_overrides(data: str, run: Path) -> list[str]:
    return [f"data.dir={data}", f"run.dir={run}", *COMMON]


def test_submitit_two_nodes_timeout_requeues_and_resumes_bit_exactly(two_node_run: Path, lm_data_dir: str,
                                                                      tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    from launch.submit import submit, wait

    run = tmp_path / "run"
    jobs = submit(str(ROOT / LM_CONFIG), _submitit_overrides(lm_data_dir, run), nodes=2, tasks_per_node=1,
                  time_min=10, max_timeouts=2)
    wait_until(lambda: checkpoint(run, EVERY).exists(), 180, "the first checkpoint")
    jobs[0]._interrupt(timeout=True)  # submitit's time-limit signal (USR2) to every task
    assert wait(jobs) == 0
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.*"))
    # submitit's own "Requeued job" line may not make it: Slurm's SIGTERM for the requeue ends rank 0 first
    assert "this job is timed-out" in logs and "resumed from" in logs
    assert logs.count("Starting with JobEnvironment") == 4  # 2 ranks x 2 attempts
    assert_bit_identical(run, two_node_run)


def test_submitit_array_runs_one_job_per_sweep_point(slurm_cluster: dict, lm_data_dir: str, tmp_path: Path) -> None:
    pytest.importorskip("submitit")
    from launch.submit import submit, wait

    sweep = tmp_path / "sweep.yaml"
    sweep.write_text("optim.lr: [1.0e-3, 2.0e-3, 3.0e-3]\n")
    base = tmp_path / "sweep"
    jobs = submit(str(ROOT / LM_CONFIG), [f"data.dir={lm_data_dir}", f"run.dir={base}", *COMMON, "train.steps=3"],
                  sweep=str(sweep), time_min=10)
    assert len(jobs) == 3 and len({j.job_id.split("_")[0] for j in jobs}) == 1  # one array
    assert wait(jobs) == 0
    runs = sorted(p for p in base.iterdir() if p.name != "submitit")
    assert [p.name for p in runs] == ["0-optim.lr=0.001", "1-optim.lr=0.002", "2-optim.lr=0.003"]
    finals = [model_params(checkpoint(r, 3)) for r in runs]
    assert not torch.equal(finals[0]["embed_tokens.weight"], finals[1]["embed_tokens.weight"])  # the points differ


def test_minitron_script_prunes_stores_logits_distills_and_skips_done_stages(slurm_cluster: dict, lm_data_dir: str,
                                                                            tmp_path: Path) -> None:
    """``sbatch slurm/minitron.sh`` on 2 nodes: prune (one task), the teacher's top-k logits (2 ranks),
    distillation from them (2 ranks); submitted again, the finished stages are skipped."""
    teacher_run = tmp_path / "teacher"
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", LM_CONFIG, f"data.dir={lm_data_dir}",
                           f"run.dir={teacher_run}", "train.steps=6", "checkpoint.every_steps=6", "eval.final=false",
                           "log.progress=false"], env=job_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    teacher, pruned, logits = checkpoint(teacher_run, 6), tmp_path / "pruned", tmp_path / "logits"
    args = [str(teacher), str(pruned), f"--layers 2 --data {lm_data_dir} --calib-samples 16", LM_CONFIG,
            f"data.dir={lm_data_dir}", f"run.dir={tmp_path / 'student'}", "train.steps=4", "checkpoint.every_steps=4",
            "eval.final=false", "log.progress=false", "parallel.timeout_s=60", "model.depth=0", "model.width=0",
            "model.num_heads=0", "model.num_kv_heads=0", "model.mlp_dim=0"]
    for attempt in range(2):
        log = tmp_path / f"minitron{attempt}.out"
        job = sbatch(["-N2", "--ntasks-per-node=1", "--cpus-per-task=1", "--time=10", f"--output={log}"],
                     "slurm/minitron.sh", args, BIGTRAIN_LOGITS=str(logits), BIGTRAIN_TOP_K="4")
        info = finish(job, log)
        text = log.read_text()
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-3000:]
        skipped = ["stage 1 (prune): ", "stage 2 (teacher logits): "]
        assert all((s in text and "complete, skipped" in text.split(s)[1].split("\n")[0]) == (attempt == 1)
                   for s in skipped), text[-3000:]
    assert json.loads((pruned / "prune_report.json").read_text())["after"]["layers"] == 2
    assert json.loads((logits / "logits.json").read_text())["top_k"] == 4
    records = train_records(tmp_path / "student")
    assert sorted(records) == [1, 2, 3, 4] and all("kd" in r for r in records.values())
