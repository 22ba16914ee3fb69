"""The CLI as a new user meets it (issue 23): help and config commands answer without torch,
progress where there is no terminal (training, evaluation, sampling, estimation), a missing
optional package named with its pip line."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, TEST_CONFIG, required_values

NO_TORCH = """
import runpy, sys
sys.argv = ["bigtrain", *{argv!r}]
try:
    runpy.run_module("bigtrain", run_name="__main__")
except SystemExit as exc:
    code = exc.code
heavy = sorted(m for m in ("torch", "numpy", "transformers", "diffusers", "PIL") if m in sys.modules)
print("HEAVY", heavy, "CODE", code, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [
    ["--help"], ["config", "describe"], ["config", "describe", "--family", "dit"], ["families"],
    *(["config", "show", str(p)] for p in sorted((ROOT / "configs").rglob("*.yaml"))),
], ids=lambda a: " ".join(Path(x).name for x in a))
def test_help_and_config_commands_do_not_import_torch(argv: list[str], tmp_path: Path) -> None:
    if argv[:2] == ["config", "show"]:  # a config that leaves keys ??? gets them, as its Command: line says
        argv = [*argv, *required_values(Path(argv[2]), tmp_path)]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH.format(argv=argv)], capture_output=True, text=True, cwd=ROOT,
                          timeout=120)
    last = proc.stderr.strip().splitlines()[-1]
    assert last in ("HEAVY [] CODE 0", "HEAVY [] CODE None"), proc.stderr[-2000:]


def test_progress_lines_at_a_steady_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Without a terminal: the first update, then one line per interval (not per update), then the
    last; each line has the position, the postfix, the rate and an ETA."""
    from bigtrain.metrics import Progress

    now = [0.0]
    progress = Progress(100, 0, "lines", True, desc="train", interval_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="bigtrain"):
        for _ in range(100):
            now[0] += 1.0  # one step a second
            progress.update({"loss": 2.5})
    lines = [r.getMessage() for r in caplog.records]
    steps = [int(line.split("step ")[1].split("/")[0]) for line in lines]
    assert steps == [1, 11, 21, 31, 41, 51, 61, 71, 81, 91, 100], steps
    assert lines[1] == "train: step 11/100 (11%) loss=2.5 | 1 step/s | elapsed 0:00:11 | ETA 0:01:29", lines[1]
    off = Progress(100, 0, "off", True, clock=lambda: now[0])
    assert off.bar is None and not off.lines


def test_training_without_a_terminal_logs_progress_lines(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(TEST_CONFIG), f"run.dir={tmp_path / 'run'}",
                           f"data.dir={tmp_path / 'data'}", "train.steps=6", "eval.every_steps=0", "eval.final=false",
                           "schedule.warmup_steps=0", "schedule.cooldown_steps=0", "log.progress_every_s=0.001"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if "train: step " in line]
    assert [line.split("train: step ")[1].split(" ")[0] for line in lines] == [f"{i}/6" for i in range(1, 7)], lines
    assert all("samples/s=" in line and "ETA " in line for line in lines), lines
    est = subprocess.run([sys.executable, "-m", "bigtrain", "estimate", str(TEST_CONFIG)], capture_output=True, text=True,
                         cwd=ROOT, timeout=300)
    assert est.returncode == 0 and "memory estimate: vit built on meta" in est.stderr, est.stderr[-3000:]
    assert "activations profiled in" in est.stderr

