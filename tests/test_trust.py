"""Checkpoints users can trust (issue 8): each test first reproduces a failure a review observed.

No code runs on load; bit rot, truncation, missing files and broken markers are detected and
fallen back from; one timeline; a safe end of run; clean failures with documented exit codes.
Single-process CLI runs of the test config (the multi-rank fallback is in test_resume.py).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_CONFIG

QUIET = ["eval.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=2", "checkpoint.keep_last=0"]
BASE = ["train.steps=6", "checkpoint.every_steps=3", *QUIET]  # checkpoints at steps 3 and 6


def cli(*args: str, faults: str = "", timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "BIGTRAIN_FAULTS": faults}
    return subprocess.run([sys.executable, "-m", "bigtrain", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def train(run: Path, data: str, *args: str, faults: str = "") -> subprocess.CompletedProcess:
    return cli("train", str(TEST_CONFIG), f"data.dir={data}", f"run.dir={run}", *args, faults=faults)


def one_line_error(proc: subprocess.CompletedProcess, rc: int, *needles: str, traceback: bool = False) -> str:
    """The run ended with ``rc`` and a last line ``error: ...`` holding ``needles``; no traceback
    unless ``traceback`` (a crash inside user-facing code keeps its traceback in the log)."""
    assert proc.returncode == rc, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    assert traceback or "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for needle in needles:
        assert needle in last, last
    return last


def records(run: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    from bigtrain.export import load_model_state

    return load_model_state(str(ckpt))


def assert_same_params(a: Path, b: Path) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k


@pytest.fixture(scope="module")
def base_run(digits_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 6-step run with checkpoints at steps 3 and 6 (copied by each test)."""
    run = tmp_path_factory.mktemp("base") / "run"
    proc = train(run, digits_dir, *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


@pytest.fixture
def run(base_run: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(base_run, dest)
    return dest


class _Payload:
    """Unpickling this runs os.system: what a crafted DCP .metadata can do to plain pickle.load."""

    def __init__(self, flag: Path) -> None:
        self.flag = flag

    def __reduce__(self) -> tuple:
        return os.system, (f"touch {self.flag}",)


def _malicious_checkpoint(path: Path, source: Path, flag: Path) -> Path:
    """A directory as the review crafted it: a payload .metadata plus a (legacy, checksum-less) marker."""
    shutil.copytree(source, path)
    (path / ".metadata").write_bytes(pickle.dumps(_Payload(flag)))
    (path / "bigtrain_complete.json").write_text(json.dumps({"step": 99999999}))
    return path


def test_malicious_metadata_is_refused_and_never_runs(run: Path, digits_dir: str, tmp_path: Path) -> None:
    flag = tmp_path / "PWNED"
    evil = _malicious_checkpoint(tmp_path / "evil", run / "checkpoints" / "step_00000006", flag)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "canary")))  # the payload is live: plain pickle runs it
    assert (tmp_path / "canary").exists()

    proc = cli("export", str(evil), "--format", "safetensors", "--out", str(tmp_path / "x.safetensors"))
    one_line_error(proc, 2, ".metadata", "refusing")
    proc = train(tmp_path / "r2", digits_dir, *BASE, f"resume={evil}")
    one_line_error(proc, 2, "resume=", ".metadata")
    assert not (tmp_path / "r2" / "checkpoints").exists(), "nothing was trained"
    proc = cli("eval", str(TEST_CONFIG), f"data.dir={digits_dir}", f"run.dir={run}", f"resume={evil}")
    one_line_error(proc, 2, ".metadata")

    # dropped into the run directory as the newest checkpoint: resume=auto skips it, moves it aside
    shutil.copytree(evil, run / "checkpoints" / "step_99999999")
    proc = train(run, digits_dir, *BASE)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000006" in proc.stderr
    assert not (run / "checkpoints" / "step_99999999").exists()
    assert [p.name.split(".")[0] for p in (run / "checkpoints-aside").iterdir()] == ["step_99999999"]
    corrupt = records(run, "checkpoint_corrupt")
    assert len(corrupt) == 1 and "refusing" in corrupt[0]["reason"]
    assert not flag.exists(), "the payload never ran"


def _flip_float_signs(distcp: Path, count: int = 16) -> None:
    """Flip the sign bit of ``count`` float32 words in the middle of a file (same size)."""
    data = bytearray(distcp.read_bytes())
    mid = (len(data) // 2) & ~3
    for i in range(count):
        data[mid + 4 * i + 3] ^= 0x80
    distcp.write_bytes(bytes(data))


def test_bit_rot_is_detected_and_fallen_back_from(run: Path, digits_dir: str, tmp_path: Path) -> None:
    latest = run / "checkpoints" / "step_00000006"
    shutil.copytree(latest, tmp_path / "reference6")
    biggest = max(latest.glob("*.distcp"), key=lambda p: p.stat().st_size)
    _flip_float_signs(biggest)
    proc = cli("export", str(latest), "--out", str(tmp_path / "x.safetensors"))
    one_line_error(proc, 2, biggest.name, "checksum mismatch")
    proc = train(tmp_path / "r2", digits_dir, *BASE, f"resume={latest}")
    one_line_error(proc, 2, "checksum mismatch")

    proc = train(run, digits_dir, *BASE)  # resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step_00000003" in proc.stderr and "checksum mismatch" in proc.stderr
    assert records(run, "checkpoint_corrupt")[0]["path"].endswith("step_00000006")
    assert_same_params(run / "checkpoints" / "step_00000006", tmp_path / "reference6")  # retrained, bit-identical
    aside = list((run / "checkpoints-aside").iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step_00000006.corrupt"), "kept, not deleted"


def _truncate(ckpt: Path) -> None:
    f = max(ckpt.glob("*.distcp"), key=lambda p: p.stat().st_size)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _remove_file(ckpt: Path) -> None:
    next(ckpt.glob("*.distcp")).unlink()


def _garble_marker(ckpt: Path) -> None:
    (ckpt / "bigtrain_complete.json").write_text('{"step": 6, "format": 2, "files": {')


# one kind of damage by default (CI time); the other two share the same fallback path
@pytest.mark.parametrize("damage", [_truncate, pytest.param(_remove_file, marks=pytest.mark.slow),
                                    pytest.param(_garble_marker, marks=pytest.mark.slow)],
                         ids=["truncated", "missing", "marker"])
def test_damaged_latest_checkpoint_is_skipped(damage, run: Path, digits_dir: str, tmp_path: Path) -> None:
    damage(run / "checkpoints" / "step_00000006")
    proc = train(tmp_path / "r2", digits_dir, *BASE, f"resume={run / 'checkpoints' / 'step_00000006'}")
    one_line_error(proc, 2, "step_00000006")
    for _ in range(2):  # no requeue loop: the second run finds a clean directory
        proc = train(run, digits_dir, *BASE)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(records(run, "checkpoint_corrupt")) == 1
    assert (run / "checkpoints" / "step_00000006" / "bigtrain_complete.json").is_file()
    assert [p.name[:22] for p in (run / "checkpoints-aside").iterdir()] == ["step_00000006.corrupt."]


def test_checkpoint_without_checksums_loads_with_a_warning(run: Path, digits_dir: str) -> None:
    marker = run / "checkpoints" / "step_00000006" / "bigtrain_complete.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({k: v for k, v in meta.items() if k not in ("format", "files")}))  # as before this change
    proc = train(run, digits_dir, "train.steps=8", "resume_allow_changes=[train.steps]", *BASE[2:])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "written before checksums" in proc.stderr and "resumed from" in proc.stderr


def test_end_of_run_is_protected(digits_dir: str, tmp_path: Path) -> None:
    """With no periodic checkpoints, a SIGTERM or a crash in the final evaluation used to lose
    all training: the final checkpoint is now committed first, under the preemption handler."""
    args = ["train.steps=4", "checkpoint.every_steps=0", "eval.fewshot=false", "schedule.cooldown_steps=1"]
    run = tmp_path / "term"
    proc = train(run, digits_dir, *args, faults="sigterm_in_eval@4")
    assert proc.returncode == 0, proc.stderr[-3000:]  # the handler caught it; eval finished
    assert (run / "checkpoints" / "step_00000004" / "bigtrain_complete.json").is_file()

    run = tmp_path / "crash"
    proc = train(run, digits_dir, *args, faults="raise_in_eval@4")
    last = one_line_error(proc, 5, "final evaluation failed", "injected", "step_00000004", traceback=True)
    assert "saved in" in last
    assert (run / "checkpoints" / "step_00000004" / "bigtrain_complete.json").is_file()
    assert json.loads((run / "results.json").read_text())["status"] == 5
    proc = train(run, digits_dir, *args)  # resubmitted: nothing to train, only the evaluation
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert records(run, "eval")[-1]["step"] == 4 and len(records(run, "checkpoint")) == 1, "no second save"


def test_resume_from_an_older_checkpoint_starts_a_new_branch(digits_dir: str, tmp_path: Path) -> None:
    args = ["train.steps=12", "checkpoint.every_steps=4", *QUIET]
    run = tmp_path / "run"
    assert train(run, digits_dir, *args).returncode == 0
    shutil.copytree(run / "checkpoints" / "step_00000012", tmp_path / "reference12")
    old_id = json.loads((run / "checkpoints" / "step_00000012" / "bigtrain_complete.json").read_text())["run_id"]
    branch_point = run / "checkpoints" / "step_00000004"
    # back to step 4, killed during the new branch's first save (before anything is committed)
    proc = train(run, digits_dir, *args, f"resume={branch_point}", faults="kill_in_write@8")
    assert proc.returncode == -9
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if not p.name.startswith(".")) == ["step_00000004"]
    assert sorted(p.name.split(".")[1] for p in (run / "checkpoints-aside").iterdir()) == ["abandoned", "abandoned"]
    timeline = json.loads((run / "timeline.json").read_text())
    assert timeline["parent"]["path"] == str(branch_point) and timeline["run_id"] != old_id
    proc = train(run, digits_dir, *args)  # resume=auto follows the new branch, not the abandoned one
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr
    meta = json.loads((run / "checkpoints" / "step_00000012" / "bigtrain_complete.json").read_text())
    assert meta["run_id"] == timeline["run_id"] and meta["parent"].endswith("step_00000008")
    assert_same_params(run / "checkpoints" / "step_00000012", tmp_path / "reference12")


def test_incompatible_resume_is_refused(run: Path, digits_dir: str, tmp_path: Path) -> None:
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    proc = train(run, digits_dir, *BASE, "model.depth=2")
    one_line_error(proc, 2, "model.depth: 4 -> 2", "resume_allow_changes=[model.depth]")
    proc = train(run, digits_dir, *BASE, "train.global_batch_size=16")
    one_line_error(proc, 2, "train.global_batch_size: 32 -> 16")
    proc = train(tmp_path / "r2", digits_dir, *BASE, "model.depth=2", f"resume={run / 'checkpoints' / 'step_00000003'}")
    one_line_error(proc, 2, "resume=", "model.depth: 4 -> 2")  # an explicit path is checked before any work
    assert not (tmp_path / "r2").exists()
    proc = train(run, digits_dir, *BASE, "model.depth=2", "resume_allow_changes=[model.depth]")
    one_line_error(proc, 2, "no place for", "model.blocks.2")  # allowed by config, refused by strict loading
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before, "nothing was trained"
    proc = train(run, digits_dir, "train.steps=8", "resume_allow_changes=[train.steps]", *BASE[2:])
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]

    # init=PATH: weights only into a new run; a deeper model keeps its extra blocks fresh
    proc = train(tmp_path / "deeper", digits_dir, *BASE, "model.depth=5", f"init={run / 'checkpoints' / 'step_00000006'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "kept fresh" in proc.stderr and "blocks.4" in proc.stderr
    proc = train(tmp_path / "wider", digits_dir, *BASE, "model.width=48", f"init={run / 'checkpoints' / 'step_00000006'}")
    one_line_error(proc, 2, "tensor shapes differ")


def test_full_disk_fails_cleanly(digits_dir: str, tmp_path: Path) -> None:
    """ENOSPC inside a checkpoint write: a periodic (asynchronous) save is abandoned and its files
    removed, training goes on; the final save exits 4 with one line and leaves no temporary."""
    run = tmp_path / "async"
    proc = train(run, digits_dir, "train.steps=8", "checkpoint.every_steps=4", "checkpoint.async_save=true", *QUIET,
                 faults="enospc_in_write@4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    failed = records(run, "checkpoint_failed")
    assert len(failed) == 1 and "No space left on device" in failed[0]["reason"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000008"]

    run = tmp_path / "final"
    proc = train(run, digits_dir, "train.steps=4", "checkpoint.every_steps=0", *QUIET, faults="enospc_in_write@4")
    one_line_error(proc, 4, "step 4", "No space left on device")
    assert list((run / "checkpoints").iterdir()) == [], "the failed save's files are gone"


def test_real_full_disk_on_a_small_tmpfs(digits_dir: str, tmp_path: Path) -> None:
    """The same on a real 2 MB file system: one checkpoint (~1.2 MB) fits, two do not."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2000k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run = mnt / "run"
        proc = train(run, digits_dir, "train.steps=12", "checkpoint.every_steps=4", "checkpoint.async_save=true",
                     "checkpoint.keep_last=1", *QUIET[:-1])
        one_line_error(proc, 4, "No space left on device")
        assert records(run, "checkpoint_failed"), "the asynchronous failure let training go on"
        assert records(run, "train")[-1]["step"] == 12
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000004"], "only complete ones"
        proc = train(run, digits_dir, "train.steps=12", *QUIET[:-1], "checkpoint.keep_last=1")
        assert "resumed from" in proc.stderr and "step_00000004" in proc.stderr, proc.stderr[-2000:]
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_no_usable_checkpoint_stops_instead_of_starting_over(run: Path, digits_dir: str) -> None:
    """Every checkpoint damaged (say, a storage outage): neither training from scratch nor moving
    anything aside happens without the user's word."""
    for step in ("step_00000003", "step_00000006"):
        _truncate(run / "checkpoints" / step)
    proc = train(run, digits_dir, *BASE)
    one_line_error(proc, 2, "no usable checkpoint", "2 failed", "resume=never")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000003", "step_00000006"]
    assert not (run / "checkpoints-aside").exists()
    proc = train(run, digits_dir, *BASE, "resume=never")  # the user's decision: start over, keep the old ones
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name.split(".")[1] for p in (run / "checkpoints-aside").iterdir()) == ["abandoned", "abandoned"]


# --- the manager in one process: retention of moved-aside checkpoints, re-saves, optional keys -----
def _tiny_state() -> tuple[torch.nn.Module, dict]:
    from bigtrain.checkpoint import ModelState, OptimizerState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    return model, {"model": ModelState(model), "optimizer": OptimizerState(model, opt)}


def test_moved_aside_checkpoints_are_bounded_and_resaves_keep_the_old_one(tmp_path: Path) -> None:
    from bigtrain.checkpoint import Checkpointer

    _, state = _tiny_state()
    ck = Checkpointer(str(tmp_path), keep_last=0, keep_aside=2)
    for step in (1, 2, 2, 2, 2):  # the same step saved again: the previous copy goes aside ("replaced")
        ck.save(step, state)
    aside = sorted(p.name.split(".")[1] for p in (tmp_path / "checkpoints-aside").iterdir())
    assert aside == ["replaced", "replaced"], "keep_aside=2 bounds what is kept aside"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_00000001", "step_00000002"]


def test_keys_added_since_may_be_absent_but_model_keys_are_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from bigtrain.checkpoint import Checkpointer, IncompatibleCheckpoint, ModelState, ScalarState

    model, state = _tiny_state()
    ck = Checkpointer(str(tmp_path))
    path = ck.save(1, state)

    class Ema:  # a component added after the checkpoint was written
        def __init__(self) -> None:
            self.decay = 0.5

        def state_dict(self) -> dict:
            return {"decay": self.decay}

        def load_state_dict(self, s: dict) -> None:
            self.decay = s["decay"]

    ema = Ema()
    with caplog.at_level("WARNING"):
        ck.load(path, {**state, "ema": ScalarState(ema)})
    assert "no 'ema' state" in caplog.text and ema.decay == 0.5
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2), torch.nn.Linear(2, 2))
    with pytest.raises(IncompatibleCheckpoint, match="Missing key"):
        ck.load(path, {"model": ModelState(bigger)})
