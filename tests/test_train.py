"""End-to-end training: CLI, metrics, checkpoints, bit-exact resume, bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bigtrain.cli import main
from bigtrain.exits import EXIT_BAD_INPUT

from conftest import ROOT, TEST_CONFIG, refused, refused_in_process


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def load_params(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / (ckpt.name + ".pt")
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=True)
    return state["model"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, env=full_env, cwd=ROOT, timeout=300)


def test_train_writes_run_dir_and_resumes_bit_exactly(digits_dir: str, tmp_path: Path) -> None:
    run = tmp_path / "run"
    common = [f"data.dir={digits_dir}", f"run.dir={run}", "data.num_workers=1"]
    proc = run_cli("train", str(TEST_CONFIG), *common)
    assert proc.returncode == 0, proc.stderr
    # outputs
    assert (run / "config.yaml").is_file() and "global_batch_size: 32" in (run / "config.yaml").read_text()
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("step", "loss", "lr", "grad_norm", "samples_per_s", "step_time_s", "host_peak_rss_gb"):
        assert all(key in r for r in train), key
    assert train[0]["loss"] == pytest.approx(math.log(10), abs=1e-3), "zero-init head starts at chance"
    evals = records(run, "eval")
    assert [r["step"] for r in evals] == [6, 12]
    assert any("top1" in k and "fewshot" in k for k in evals[-1])
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step_00000004", "step_00000008", "step_00000012"]
    reference = load_params(run / "checkpoints" / "step_00000012")

    # Simulate a crash after step 4: later checkpoints are gone, metrics run past it.
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    shutil.move(run / "checkpoints" / "step_00000012", tmp_path / "ref12")
    proc = run_cli("train", str(TEST_CONFIG), *common, "resume=auto")
    assert proc.returncode == 0, proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    resumed = records(run, "train")
    assert [r["step"] for r in resumed] == list(range(1, 13)), "metrics.jsonl reads like one run"
    assert [r["loss"] for r in resumed] == [r["loss"] for r in train], "losses bit-identical after resume"
    assert [r["grad_norm"] for r in resumed] == [r["grad_norm"] for r in train]
    final = load_params(run / "checkpoints" / "step_00000012")
    assert final.keys() == reference.keys()
    for name in reference:
        assert torch.equal(final[name], reference[name]), name

    # `bigtrain eval` on the final checkpoint reproduces the final evaluation
    proc = run_cli("eval", str(TEST_CONFIG), *common)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["eval/top1"] == pytest.approx(records(run, "eval")[-1]["eval/top1"])


def test_in_process_resume_matches_with_changed_workers(tiny_cfg, tmp_path: Path) -> None:
    """Resume under a different data-loader worker count continues the same stream."""
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    cfg = tiny_cfg("train.steps=6", "checkpoint.every_steps=3", "eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=2")
    full = build_trainer(cfg)
    full.fit(MetricsLogger(cfg.run.dir, True))
    losses = [r["loss"] for r in records(Path(cfg.run.dir), "train")]
    shutil.rmtree(Path(cfg.run.dir) / "checkpoints" / "step_00000006")
    cfg2 = tiny_cfg("train.steps=6", "checkpoint.every_steps=3", "eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=2", "data.num_workers=2")
    again = build_trainer(cfg2)
    assert again.maybe_resume() == 3
    again.fit(MetricsLogger(cfg.run.dir, True, resume_step=3))
    assert [r["loss"] for r in records(Path(cfg.run.dir), "train")] == losses
    for (n, a), (_, b) in zip(full.model.named_parameters(), again.model.named_parameters()):
        assert torch.equal(a, b), n


def test_incomplete_checkpoints_are_never_picked(tiny_cfg) -> None:
    from bigtrain.checkpoint import CheckpointError
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    cfg = tiny_cfg("train.steps=4", "eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=1")
    trainer = build_trainer(cfg)
    trainer.fit(MetricsLogger(cfg.run.dir, True))
    root = Path(cfg.run.dir) / "checkpoints"
    # a save killed mid-way (temporary dir) and a directory with data but no completion marker
    (root / ".tmp_step_00000008").mkdir()
    (root / ".tmp_step_00000008" / "__0_0.distcp").write_bytes(b"partial")
    shutil.copytree(root / "step_00000004", root / "step_00000006")
    (root / "step_00000006" / "bigtrain_complete.json").unlink()
    assert trainer.checkpointer.latest() == str(root / "step_00000004")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        trainer.checkpointer.resolve(str(root / "step_00000006"))
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        trainer.checkpointer.resolve(str(root / "step_00000099"))


def test_bf16_autocast_trains(tiny_cfg) -> None:
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    cfg = tiny_cfg("train.steps=3", "train.dtype=bfloat16", "eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=1", "checkpoint.every_steps=0")
    trainer = build_trainer(cfg)
    assert trainer.fit(MetricsLogger(cfg.run.dir, True)) == 0
    train = records(Path(cfg.run.dir), "train")
    assert len(train) == 3 and all(0 < r["loss"] < 5 for r in train)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters()), "master weights stay fp32"


def test_wandb_offline(tiny_cfg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg()
    rc = main(["train", str(TEST_CONFIG), f"data.dir={cfg.data.dir}", f"run.dir={cfg.run.dir}", "train.steps=3",
               "schedule.cooldown_steps=1", "eval.fewshot=false", "log.wandb=true", "log.wandb_project=bigtrain-test"])
    assert rc == 0
    runs = list((Path(cfg.run.dir) / "wandb").glob("offline-run-*"))
    assert runs, "wandb wrote an offline run"
    assert any(f.suffix == ".wandb" and f.stat().st_size > 0 for f in runs[0].iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["train.stepz=3"], "unknown config key 'train.stepz' (did you mean 'train.steps'?)"),
        (["data.dir=/nonexistent/x", "data.source=none"], "has no shards"),
        (["train.global_batch_size=30"], "not divisible by 'train.micro_batch_size'"),
        (["model.num_classes=5"], "model.num_classes"),
        (["resume=/nonexistent/ckpt"], "no such checkpoint directory"),
        (["init=/nonexistent/ckpt"], "no such checkpoint directory"),
        # each key a review found accepted (and failing late, or dividing by zero)
        (["log.every_steps=0"], "'log.every_steps' must be > 0, got 0"),
        (["eval.batch_size=-1"], "'eval.batch_size' must be > 0, got -1"),
        (["data.num_workers=-2"], "'data.num_workers' must be >= -1, got -2"),
        (["checkpoint.every_steps=-4"], "'checkpoint.every_steps' must be >= 0"),
        (["eval.every_steps=-1"], "'eval.every_steps' must be >= 0"),
        (["checkpoint.keep_last=-1"], "'checkpoint.keep_last' must be >= 0"),
        (["checkpoint.keep_aside=-1"], "'checkpoint.keep_aside' must be >= 0"),
        (["data.max_member_bytes=-1"], "'data.max_member_bytes' must be >= 0"),
        (["resume_allow_changes=[train.stepz]"], "'train.stepz' is not a config key"),
        (["optim.name=adafactor"], "unknown optimizer 'adafactor' (registered: adamw, adamw8bit, factored, sgd)"),
        pytest.param(["parallel.device=cuda"], "no CUDA device is available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")),
    ],
)
def test_bad_input_exits_2_with_one_line(digits_dir: str, tmp_path: Path, args: list[str], message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    """In this process (the CLI's own error mapping, without a torch import per probe); the first
    case also as a subprocess, the contract a user sees."""
    from bigtrain.cli import _main

    argv = ["train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={tmp_path / 'r'}", *args]
    last = refused_in_process(capsys, _main, *argv)
    assert message in last, last
    if args == ["train.stepz=3"]:
        assert message in refused(run_cli(*argv))
    assert not (tmp_path / "r" / "checkpoints").exists(), "nothing was trained"


def test_missing_config_file_and_unknown_command() -> None:
    assert main(["train", "configs/nope.yaml"]) == EXIT_BAD_INPUT
    assert main(["frobnicate"]) == EXIT_BAD_INPUT
    assert main(["config", "describe"]) == 0


def test_tiny_vit_learns_digits(tiny_cfg) -> None:
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    cfg = tiny_cfg("train.steps=200", "model.dropout=0.0", "eval.every_steps=0", "checkpoint.every_steps=0",
                   "checkpoint.save_final=false", "schedule.warmup_steps=10", "schedule.cooldown_steps=40",
                   "train.global_batch_size=64", "train.micro_batch_size=0")
    trainer = build_trainer(cfg)
    trainer.fit(MetricsLogger(cfg.run.dir, True))
    # measured 0.65 top-1 (chance 0.10) for this 200-step, 16x16 run
    assert trainer.last_eval["eval/top1"] > 0.4
    assert trainer.last_eval["eval/fewshot_5shot_top1"] > 0.3


@pytest.mark.slow
def test_default_job_reaches_90_percent(tmp_path: Path) -> None:
    """The README's main command, unchanged but for where it writes."""
    proc = run_cli("train", "configs/vit/digits_tiny.yaml", f"run.dir={tmp_path / 'run'}", f"data.dir={tmp_path / 'data'}")
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["eval/top1"] > 0.9


def test_report_png_and_progress_bar(tiny_cfg, capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from bigtrain.config import dump_yaml
    from bigtrain.metrics import MetricsLogger, Progress
    from bigtrain.recipes import build_trainer
    from bigtrain.report import HEADER_H, PANEL_H, PANEL_W, make_report, read_metrics, summary_lines

    cfg = tiny_cfg("train.steps=4", "schedule.cooldown_steps=1", "eval.every_steps=2", "eval.fewshot=false", "log.progress=on",
                   "run.name=digits-smoke")
    trainer = build_trainer(cfg)
    trainer.fit(MetricsLogger(cfg.run.dir, True))
    err = capsys.readouterr().err
    assert "4/4" in err and "samples/s" in err, "progress bar shows steps, throughput"
    (Path(cfg.run.dir) / "config.yaml").write_text(dump_yaml(cfg))  # as prepare_run writes it
    png = make_report(cfg.run.dir)
    img = Image.open(png)
    assert img.size == (2 * PANEL_W, HEADER_H + 2 * PANEL_H)
    assert len(img.convert("L").getcolors(maxcolors=1 << 16)) > 5, "something was drawn"
    recs = read_metrics(cfg.run.dir)
    head, final = summary_lines(cfg.run.dir, [r for r in recs if r["kind"] == "train"],
                                [r for r in recs if r["kind"] == "eval"])
    assert head.startswith("digits-smoke") and final.startswith("final: step 4/4, training loss ")
    assert "eval top1 " in final and "(eval at step 4)" in final, final
    assert img.convert("L").crop((0, 0, 2 * PANEL_W, HEADER_H)).getextrema()[0] < 128, "the heading is drawn"
    bar = Progress(10, 0, "auto", enabled=True)  # stderr is not a TTY under pytest: lines, no bar
    assert bar.bar is None and bar.lines


def test_time_based_saves_and_retention(tiny_cfg) -> None:
    """checkpoint.every_minutes saves on wall time; keep_last k plus every j-th survive pruning."""
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    quiet = ["eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=1"]
    cfg = tiny_cfg("train.steps=7", "checkpoint.every_steps=0", "checkpoint.every_minutes=0.00001",
                   "checkpoint.keep_last=2", "checkpoint.keep_every=3", *quiet)
    assert build_trainer(cfg).fit(MetricsLogger(cfg.run.dir, True)) == 0
    saved = [r["step"] for r in records(Path(cfg.run.dir), "checkpoint")]
    assert saved == [1, 2, 3, 4, 5, 6, 7], "a save after every step (the interval is ~1 ms)"
    kept = sorted(p.name for p in (Path(cfg.run.dir) / "checkpoints").iterdir())
    assert kept == ["step_00000003", "step_00000006", "step_00000007"]


def test_deadline_stops_and_saves_before_it(tiny_cfg) -> None:
    """train.deadline (what the Slurm launchers set from the job's end time): the run stops while
    the next step and the save still fit, so it has saved and returned before the deadline."""
    import time

    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    deadline = time.time() + 4
    cfg = tiny_cfg("train.steps=100000", "checkpoint.every_steps=25", "eval.every_steps=0", "eval.fewshot=false",
                   "log.progress=false", "schedule.cooldown_steps=0", f"train.deadline={deadline}")
    trainer = build_trainer(cfg)
    assert trainer.fit(MetricsLogger(cfg.run.dir, True)) == 75
    assert time.time() < deadline, "returned after the deadline"
    latest = trainer.checkpointer.latest()
    assert trainer.state.step > 1 and latest is not None and latest.endswith(f"step_{trainer.state.step:08d}")


def _catches(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler for ``sig`` (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def test_preemption_notice_during_start_up_is_kept(digits_dir: str, tmp_path: Path) -> None:
    """USR2 while the process still imports torch (Slurm may send --signal up to a minute early):
    not fatal; training stops after its first step, saved, exit 75 (requeue), not 140 (crash)."""
    import signal
    import time

    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(TEST_CONFIG), f"data.dir={digits_dir}",
                          f"run.dir={run}", "eval.every_steps=0", "eval.fewshot=false", "log.progress=false"],
                         cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not _catches(p.pid, signal.SIGUSR2):  # the early handler is in place (before torch is imported)
        assert time.monotonic() < deadline and p.poll() is None, "the handler never appeared"
        time.sleep(0.01)
    assert "libtorch" not in Path(f"/proc/{p.pid}/maps").read_text(), "handler only after torch was loaded"
    p.send_signal(signal.SIGUSR2)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 75, err[-2000:]
    assert "signal SIGUSR2 at step 1" in err
    assert (run / "checkpoints" / "step_00000001" / "bigtrain_complete.json").is_file()


def test_time_budget_and_sigterm_exit_75_after_saving(digits_dir: str, tmp_path: Path) -> None:
    """Both stop after the current step, save, and exit 75 (requeue); a rerun continues."""
    import signal
    import time

    common = [f"data.dir={digits_dir}", "eval.every_steps=0", "eval.fewshot=false", "checkpoint.every_steps=0"]
    run = tmp_path / "budget"
    proc = run_cli("train", str(TEST_CONFIG), *common, f"run.dir={run}", "train.max_minutes=0.00001")
    assert proc.returncode == 75, proc.stderr[-2000:]
    assert "train.max_minutes" in proc.stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_00000001"]
    proc = run_cli("train", str(TEST_CONFIG), *common, f"run.dir={run}")
    assert proc.returncode == 0 and "step_00000001" in proc.stderr

    run = tmp_path / "sigterm"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "bigtrain", "train", str(TEST_CONFIG), *common, f"run.dir={run}",
                          "train.steps=100000", "schedule.cooldown_steps=0"], cwd=ROOT, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len(records(run, "train")) >= 2):
            assert time.monotonic() < deadline and p.poll() is None, "training did not start"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 75, err[-2000:]
    step = json.loads((run / "results.json").read_text())["step"]
    assert (run / "checkpoints" / f"step_{step:08d}" / "bigtrain_complete.json").is_file()


def test_auto_data_workers_share_the_nodes_cores_on_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """data.num_workers=-1: none on the CPU; on a GPU the cores per rank minus one, at most 8."""
    from types import SimpleNamespace

    import torch

    from bigtrain.recipes import data_workers

    auto, cpu, gpu = SimpleNamespace(data=SimpleNamespace(num_workers=-1)), torch.device("cpu"), SimpleNamespace(type="cuda")
    for k in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE", "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)))
    assert data_workers(auto, SimpleNamespace(device=cpu)) == 0
    assert data_workers(SimpleNamespace(data=SimpleNamespace(num_workers=3)), SimpleNamespace(device=gpu)) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # torchrun: 8 ranks share 32 cores
    assert data_workers(auto, SimpleNamespace(device=gpu)) == 3
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4(x2)")
    assert data_workers(auto, SimpleNamespace(device=gpu)) == 7
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "32")  # srun: the affinity is already this task's
    assert data_workers(auto, SimpleNamespace(device=gpu)) == 8
