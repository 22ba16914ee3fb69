"""Numerical guard: skip non-finite steps, roll back after repeated ones or a loss spike,
optionally skip the offending data window; give up with a clear error when it cannot recover."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bigtrain.resilience import NumericalGuard

from conftest import TEST_CONFIG

QUIET = ["eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=1", "model.dropout=0"]


def records(run_dir: str, kind: str) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def test_guard_verdicts() -> None:
    g = NumericalGuard(max_bad_steps=2, spike_factor=3.0, window=3)
    assert g.check(float("nan"), 1.0).action == "skip"
    v = g.check(1.0, float("inf"))
    assert v.action == "rollback" and v.bad_steps == 2
    g.reset()
    for loss in (2.0, 2.2, 1.8):  # fills the window; a spike before that is not judged
        assert g.check(loss, 1.0).action == "ok"
    assert g.check(5.9, 1.0).action == "ok"  # < 3 x mean 2.0
    v = g.check(100.0, 1.0)
    assert v.action == "rollback" and "spike" in v.reason and v.bad_steps == 1
    assert NumericalGuard(0, 0.0, 3).check(float("nan"), 0.0).action == "skip", "0 = never roll back"


def _fit(cfg, monkeypatch: pytest.MonkeyPatch, faults: str):
    from bigtrain.metrics import MetricsLogger
    from bigtrain.recipes import build_trainer

    monkeypatch.setenv("BIGTRAIN_FAULTS", faults)
    monkeypatch.setattr("bigtrain.faults._fired", set())
    trainer = build_trainer(cfg)
    status = trainer.fit(MetricsLogger(cfg.run.dir, True))
    return trainer, status


def test_nan_steps_skip_then_roll_back_and_skip_the_data(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg("train.steps=8", "checkpoint.every_steps=3", "train.max_bad_steps=2", *QUIET)
    trainer, status = _fit(cfg, monkeypatch, "nan_loss@4,nan_loss@5")
    assert status == 0 and trainer.state.step == 8
    rb = records(cfg.run.dir, "rollback")
    assert len(rb) == 1 and rb[0]["to_step"] == 3 and "2 consecutive non-finite" in rb[0]["reason"]
    gbs = cfg.train.global_batch_size
    assert rb[0]["skipped_window"] == [4 * gbs, 6 * gbs], "the two offending steps' samples"
    # steps 4-5 replayed after the rollback draw the samples after the skipped window
    assert trainer.stream.consumed_samples == 8 * gbs + 2 * gbs
    losses = [r["loss"] for r in records(cfg.run.dir, "train")]
    assert all(math.isfinite(x) for x in losses[-4:])
    params = [p for p in trainer.model.parameters()]
    assert all(bool(p.isfinite().all()) for p in params)


def test_loss_spike_rolls_back(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tiny_cfg("train.steps=9", "checkpoint.every_steps=4", "train.spike_factor=5", "train.spike_window=3",
                   "train.rollback_skip_data=false", *QUIET)
    trainer, status = _fit(cfg, monkeypatch, "loss_scale@6")
    assert status == 0
    rb = records(cfg.run.dir, "rollback")
    assert len(rb) == 1 and rb[0]["to_step"] == 4 and "spike" in rb[0]["reason"] and rb[0]["skipped_window"] is None
    assert trainer.state.skipped_steps == 0, "counter restored from the checkpoint; the replay was clean"
    assert trainer.stream.consumed_samples == 9 * cfg.train.global_batch_size


def test_no_checkpoint_to_roll_back_to_is_a_clear_error(tiny_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    from bigtrain.exits import TrainingDiverged

    cfg = tiny_cfg("train.steps=6", "checkpoint.every_steps=0", "train.max_bad_steps=1", *QUIET)
    with pytest.raises(TrainingDiverged, match="no checkpoint to roll back to"):
        _fit(cfg, monkeypatch, "nan_loss@2")


def test_cli_exit_code_when_diverged(digits_dir: str, tmp_path: Path) -> None:
    """A learning rate that blows up: skipped, rolled back max_rollbacks times, then exit 3."""
    import subprocess
    import sys

    from conftest import ROOT

    cmd = [sys.executable, "-m", "bigtrain", "train", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={tmp_path}",
           "optim.lr=1e30", "optim.grad_clip_norm=0", "train.steps=30", "checkpoint.every_steps=1", "train.max_bad_steps=1",
           "train.max_rollbacks=2", "schedule.warmup_steps=0", *QUIET]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "training diverged" in proc.stderr and "max_rollbacks=2" in proc.stderr
    assert len(records(str(tmp_path), "rollback")) == 2
