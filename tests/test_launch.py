"""Launchers without a Slurm cluster: the batch side's decisions (``launch.slurm_job --dry-run``),
sweep files, refusals, and submitit's local executor with a preemption (two ranks, one machine)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_resume import train_records

LM_CONFIG = "configs/llm/stdlib_test.yaml"


def dry_run(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch, env: dict[str, str], *args: str) -> str:
    from launch.slurm_job import main

    for k in [k for k in os.environ if k.startswith("SLURM_") or k.startswith("BIGTRAIN_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main([LM_CONFIG, *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def test_batch_side_builds_one_task_per_rank_with_deadline_and_resume(capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    end = int(time.time()) + 3600
    out = dry_run(capsys, monkeypatch, {"SLURM_JOB_ID": "4242", "SLURM_JOB_END_TIME": str(end), "SLURM_NTASKS": "4",
                                        "SLURM_RESTART_COUNT": "2", "BIGTRAIN_OVERRIDES": "train.steps=7"},
                  "train.seed=3", "resume=/some/ckpt")
    line = next(ln for ln in out.splitlines() if "run: srun" in ln)
    assert "--kill-on-bad-exit=1" in line and "torchrun" not in line and " -m bigtrain train " in line
    # environment overrides first, then the command line's; a restart resumes from the newest checkpoint
    assert line.index("train.steps=7") < line.index("train.seed=3") < line.index("resume=/some/ckpt") \
        < line.index("resume=auto")
    assert f"train.deadline={end - 60}" in line  # end time minus BIGTRAIN_DEADLINE_MARGIN_S (60)
    assert "4 ranks, rendezvous" in out and f":{20000 + 4242}" in out  # port from the job id


def test_batch_side_refuses_a_bad_config_with_exit_2(capsys: pytest.CaptureFixture,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.slurm_job import main

    with pytest.raises(SystemExit) as exc:
        main([LM_CONFIG, "optim.lrr=1", "--dry-run"])
    assert exc.value.code == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["nope.yaml", "--dry-run"])
    assert exc.value.code == 2 and "config file 'nope.yaml' not found" in capsys.readouterr().err


def test_requeue_decision_respects_the_caps(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from launch.slurm_job import after_step

    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    monkeypatch.setenv("BIGTRAIN_MAX_REQUEUES", "3")
    assert after_step(75) == 75
    assert "not requeued: 3 restarts already (BIGTRAIN_MAX_REQUEUES=3)" in capsys.readouterr().out
    assert after_step(2) == 2 and "bad input" in capsys.readouterr().out
    assert after_step(137) == 137 and "BIGTRAIN_CRASH_REQUEUES=0" in capsys.readouterr().out
    assert after_step(0) == 0


def test_sweep_files(tmp_path: Path) -> None:
    from launch.submit import SubmitError, plan, sweep_points

    grid = tmp_path / "grid.yaml"
    grid.write_text("optim.lr: [1.0e-3, 3.0e-3]\ntrain.seed: [0, 1]\n")
    assert sweep_points(str(grid)) == [["optim.lr=0.001", "train.seed=0"], ["optim.lr=0.001", "train.seed=1"],
                                       ["optim.lr=0.003", "train.seed=0"], ["optim.lr=0.003", "train.seed=1"]]
    points = tmp_path / "points.yaml"
    points.write_text("- {optim.lr: 1.0e-3}\n- [train.seed=2, run.dir=/x/mine]\n")
    jobs = plan(str(ROOT / LM_CONFIG), ["run.dir=/r/base"], str(points))
    assert jobs == [["run.dir=/r/base", "optim.lr=0.001", "run.dir=/r/base/0-optim.lr=0.001"],
                    ["run.dir=/r/base", "train.seed=2", "run.dir=/x/mine"]]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- {optim.lrr: 1}\n")
    with pytest.raises(SubmitError, match="unknown config key 'optim.lrr'"):
        plan(str(ROOT / LM_CONFIG), [], str(bad))
    bad.write_text("just a string\n")
    with pytest.raises(SubmitError, match="expected a non-empty list of points"):
        sweep_points(str(bad))


@pytest.mark.parametrize("args,needle", [
    (["--local", "--nodes", "2"], "--local runs on this one machine: --nodes must be 1"),
    (["--gpus-per-node", "-1"], "--gpus-per-node -1: must be at least 0"),
    (["--signal-delay", "-5"], "--signal-delay -5: must be at least 0"),
    (["--max-timeouts", "-1"], "--max-timeouts -1: must be at least 0"),
    (["--sbatch", "account"], "--sbatch takes KEY=VALUE"),
    (["optim.lrr=1", "--local"], "unknown config key 'optim.lrr'"),
    (["resume=/no/such/checkpoint", "--local"], "resume=/no/such/checkpoint"),
    (["--folder", "/proc/bigtrain-nope", "--local"], "--folder /proc/bigtrain-nope: not writable"),
])
def test_submit_refuses_bad_input_with_one_line_and_exit_2(args: list[str], needle: str,
                                                           capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("submitit")
    from conftest import refused_in_process
    from launch.submit import main

    assert needle in refused_in_process(capsys, main, LM_CONFIG, *args)


def test_submit_without_sbatch_and_batch_side_environment_errors(capsys: pytest.CaptureFixture,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit")
    from launch.slurm_job import main as batch_main
    from launch.submit import main

    monkeypatch.setenv("PATH", "/nonexistent")
    assert main([LM_CONFIG]) == 2
    assert "no sbatch on this machine's PATH" in capsys.readouterr().err
    monkeypatch.undo()
    for name, value, needle in (("BIGTRAIN_OVERRIDES", "train.steps='7", "BIGTRAIN_OVERRIDES: No closing quotation"),
                                ("BIGTRAIN_SRUN_ARGS", "--x='1", "BIGTRAIN_SRUN_ARGS: No closing quotation"),
                                ("BIGTRAIN_MAX_REQUEUES", "many", "BIGTRAIN_MAX_REQUEUES='many' is not an integer"),
                                ("BIGTRAIN_MAX_REQUEUES", "-1", "must be >= 0")):
        monkeypatch.setenv(name, value)
        with pytest.raises(SystemExit) as exc:
            batch_main([LM_CONFIG, "--dry-run"])
        assert exc.value.code == 2 and needle in capsys.readouterr().err
        monkeypatch.delenv(name)


# max_timeouts=3 (requeued and finished) is slow: tests/test_slurm.py proves the same requeue through
# submitit on a real Slurm by default; 0 (not requeued, exit 75) is this file's own path
@pytest.mark.parametrize("max_timeouts", [pytest.param(3, marks=pytest.mark.slow), 0])
def test_submitit_local_two_ranks_preempted_requeued_and_finished(max_timeouts: int, tmp_path: Path) -> None:
    """``--local``: the same job through submitit's local executor. USR2 to one rank (what
    submitit's controller sends before its time limit): all ranks save, rank 0 requeues, the
    restarted tasks resume and finish; ``--wait`` exits 0. With ``--max-timeouts 0`` the saved
    job is not requeued and ``--wait`` exits 75 (resubmit to continue)."""
    pytest.importorskip("submitit")
    from data_pipeline.text import write_text_shards

    data, run = tmp_path / "data", tmp_path / "run"
    write_text_shards(str(data), seq_len=64, max_bytes=300_000, samples_per_shard=256)
    cmd = [sys.executable, "-m", "launch.submit", LM_CONFIG, f"data.dir={data}", f"run.dir={run}", "train.steps=80",
           "checkpoint.every_steps=20", "eval.every_steps=0", "log.progress=false", "parallel.timeout_s=60",
           "--local", "--tasks-per-node", "2", "--wait", "--max-timeouts", str(max_timeouts),
           # submitit counts a signal as a time-out once 80% of the limit or all but 10 min of it have passed
           "--time", "60" if max_timeouts else "5"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not (run / "checkpoints" / "step_00000020").exists():
            assert time.monotonic() < deadline and proc.poll() is None, "no first checkpoint"
            time.sleep(0.2)
        rank1 = [p for p in _submitit_tasks(run / "submitit") if _environ(p).get("SUBMITIT_LOCAL_GLOBALID") == "1"]
        assert rank1, "rank 1 not found"
        os.kill(rank1[0], signal.SIGUSR2)  # one rank only: the ranks agree at the next step
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    logs = "".join(p.read_text() for p in (run / "submitit").glob("*_log.*"))
    if max_timeouts == 0:
        assert proc.returncode == 75 and "ended with status 75" in out, out[-3000:]
        assert "timed-out too many times" in logs and "resumed from" not in logs
        assert json.loads((run / "results.json").read_text())["status"] == 75
        return
    assert proc.returncode == 0, out[-3000:]
    assert "ended with status 0" in out
    assert "signal on another rank" in logs and "Requeued job" in logs and "resumed from" in logs
    assert sorted(train_records(run)) == list(range(1, 81))
    assert json.loads((run / "results.json").read_text())["status"] == 0


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return {}
    return dict(kv.decode(errors="replace").split("=", 1) for kv in raw if b"=" in kv)


def _submitit_tasks(folder: Path) -> list[int]:
    """The task processes of submitit jobs in ``folder`` (``python -m submitit.core._submit FOLDER``)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"submitit.core._submit" in cmd and str(folder).encode() in cmd:
            out.append(int(pid))
    return out
