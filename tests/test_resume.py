"""Multi-process checkpoints: exact resume after preemption or kill -9 (same layout),
elastic resume under other layouts, and export of a sharded checkpoint.

Exact: final parameters bit-identical to the uninterrupted run (fp32, dropout on).
Elastic: losses after the resume within LOSS_RTOL of the uninterrupted run, final
parameters within PARAM_RTOL (as ||P - P_ref|| / ||P_ref - P_ckpt||), dropout off
(a different layout draws dropout masks from different per-rank streams).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_CONFIG, launch

LOSS_RTOL = 1e-5
PARAM_RTOL = 2e-5
COMMON = ["eval.every_steps=0", "eval.fewshot=false", "checkpoint.keep_last=0", "parallel.timeout_s=60", "log.every_steps=1"]


def torchrun(nproc: int, *args: str, faults: str = "", wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """``bigtrain train`` of the test config under torchrun (also for one rank: its rank environment)."""
    return launch("train", str(TEST_CONFIG), *COMMON, *args, nproc=nproc, torchrun=True, wait=wait,
                  env={"BIGTRAIN_FAULTS": faults})


def train_records(run: Path) -> dict[int, dict]:
    """Last record per step (a resumed run rewrites the steps after its checkpoint)."""
    out: dict[int, dict] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r
    return out


def model_params(ckpt: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = ckpt.parent / (ckpt.name + ".pt")
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=True)["model"]


def check_elastic_continuation(ref_run: Path, run: Path, label: object, param_rtol: float) -> None:
    """A run resumed from ``ref_run``'s step-4 checkpoint under another layout: steps 5-8 within
    LOSS_RTOL of the uninterrupted run, final parameters within ``param_rtol`` of its norm."""
    ref, got = train_records(ref_run), train_records(run)
    assert sorted(got) == [5, 6, 7, 8]
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_RTOL), (label, s)
    final_ref = model_params(ref_run / "checkpoints" / "step_00000008")
    final = model_params(run / "checkpoints" / "step_00000008")
    diff = sum(float((final[k] - final_ref[k]).double().pow(2).sum()) for k in final_ref) ** 0.5
    norm = sum(float(final_ref[k].double().pow(2).sum()) for k in final_ref) ** 0.5
    assert diff / norm <= param_rtol, (label, diff / norm)


def rel_param_diff(a: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> float:
    num = sum(float((a[k] - ref[k]).double().pow(2).sum()) for k in ref)
    den = sum(float((ref[k] - start[k]).double().pow(2).sum()) for k in ref)
    return (num / den) ** 0.5


# --- exact resume: preemption and kill -9, dp2 zero1, dropout on, async saves -------------------
EXACT = ["train.steps=24", "checkpoint.every_steps=8", "checkpoint.async_save=true", "parallel.zero=1",
         "schedule.cooldown_steps=4"]


@pytest.fixture(scope="module")
def uninterrupted(digits_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def _final(run: Path) -> dict[str, torch.Tensor]:
    return model_params(run / "checkpoints" / "step_00000024")


def _assert_bit_identical(run: Path, reference: Path) -> None:
    ref, got = train_records(reference), train_records(run)
    assert sorted(got) == sorted(ref) == list(range(1, 25))
    assert [got[s]["loss"] for s in ref] == [ref[s]["loss"] for s in ref]
    a, b = _final(run), _final(reference)
    for name in b:
        assert torch.equal(a[name], b[name]), name


def test_signal_to_one_rank_saves_stops_and_resumes_exactly(uninterrupted: Path, digits_dir: str, tmp_path: Path) -> None:
    """SIGUSR1 reaches rank 1 only: both ranks agree to stop after the step, save, report
    status 75; the resumed run ends bit-identical to the uninterrupted one."""
    run = tmp_path / "run"
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT, wait=False)
    assert isinstance(proc, subprocess.Popen)
    try:
        deadline = time.monotonic() + 120
        while not ((run / "metrics.jsonl").exists() and len(train_records(run)) >= 3):
            assert time.monotonic() < deadline and proc.poll() is None, "training did not start"
            time.sleep(0.05)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(workers) == 2
        os.kill(int(workers[-1]), signal.SIGUSR1)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == 75, err[-3000:]  # torchrun itself collapses worker exit codes to 1
    stopped = results["step"]
    assert 3 <= stopped < 24
    assert (run / "checkpoints" / f"step_{stopped:08d}" / "bigtrain_complete.json").is_file()
    assert "signal SIGUSR1" in err or "on another rank" in err
    proc2 = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert f"step_{stopped:08d}" in proc2.stderr
    _assert_bit_identical(run, uninterrupted)


def test_kill9_during_save_keeps_previous_checkpoint(uninterrupted: Path, digits_dir: str, tmp_path: Path) -> None:
    """Rank 1 is SIGKILLed after writing its shard of the step-16 checkpoint, before the
    commit: step 16 stays a temporary directory, resume picks step 8 and ends bit-identical."""
    run = tmp_path / "run"
    # synchronous saves here: the fault fires between a rank's write and the commit barrier
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT, "checkpoint.async_save=false",
                    faults="kill_in_save@16:1")
    assert proc.returncode != 0
    ckpts = run / "checkpoints"
    assert (ckpts / ".tmp_step_00000016").is_dir() and not (ckpts / "step_00000016").exists()
    assert (ckpts / "step_00000008" / "bigtrain_complete.json").is_file()
    proc2 = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert "step_00000008" in proc2.stderr
    _assert_bit_identical(run, uninterrupted)
    assert not (ckpts / ".tmp_step_00000016").exists(), "the stale temporary is cleaned up"


# --- elastic resume ---------------------------------------------------------------------------
ELASTIC = ["train.steps=8", "checkpoint.every_steps=4", "model.dropout=0", "train.micro_batch_size=0",
           "schedule.cooldown_steps=2"]
SAVED_LAYOUTS = {
    "dp4-zero3": (4, ["parallel.dp=4", "parallel.zero=3"]),
    "pp2xdp2": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.microbatches=2"]),
}
# (saved layout, processes, overrides of the resumed run)
RESUMES = [
    # slow: a twin of the two below (another 4-rank target layout of the same saved checkpoint)
    pytest.param("dp4-zero3", 4, ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"], marks=pytest.mark.slow),
    ("dp4-zero3", 1, []),
    ("pp2xdp2", 4, ["parallel.dp=4", "parallel.zero=2"]),
]


@pytest.fixture(scope="module")
def saved(digits_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    runs = {}
    for name, (nproc, layout) in SAVED_LAYOUTS.items():
        run = tmp_path_factory.mktemp(name)
        proc = torchrun(nproc, f"data.dir={digits_dir}", f"run.dir={run}", *ELASTIC, *layout)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run
    return runs


@pytest.mark.parametrize("source,nproc,layout", RESUMES, ids=lambda v: v if isinstance(v, str) else None)
def test_elastic_resume_matches_uninterrupted(saved: dict[str, Path], source: str, nproc: int, layout: list[str],
                                               digits_dir: str, tmp_path: Path) -> None:
    ref_run = saved[source]
    ckpt = ref_run / "checkpoints" / "step_00000004"
    run = tmp_path / "run"
    args = [f"data.dir={digits_dir}", f"run.dir={run}", *ELASTIC, *layout, f"resume={ckpt}"]
    proc = _one_process(*args) if nproc == 1 else torchrun(nproc, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = train_records(ref_run), train_records(run)
    assert sorted(got) == [5, 6, 7, 8], "continues at step 5"
    for s in got:
        assert got[s]["loss"] == pytest.approx(ref[s]["loss"], rel=LOSS_RTOL), s
        assert got[s]["samples_seen"] == ref[s]["samples_seen"]
    final_ref = model_params(ref_run / "checkpoints" / "step_00000008")
    final = model_params(run / "checkpoints" / "step_00000008")
    assert rel_param_diff(final, final_ref, model_params(ckpt)) <= PARAM_RTOL


def test_export_safetensors_from_a_four_rank_zero3_checkpoint(saved: dict[str, Path], tmp_path: Path) -> None:
    from safetensors.torch import load_file

    ckpt = saved["dp4-zero3"] / "checkpoints" / "step_00000008"
    out = tmp_path / "model.safetensors"
    proc = launch("export", str(ckpt), "--format", "safetensors", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    exported = load_file(str(out))
    reference = model_params(ckpt)
    assert exported.keys() == reference.keys()
    for k in reference:
        assert torch.equal(exported[k], reference[k]), k


def _corrupt_every_nth_image(root: Path, n: int) -> int:
    """Overwrite the bytes of every n-th PNG member in place (same size: the tar stays valid)."""
    import tarfile

    hit = 0
    for shard in sorted(root.glob("train-*.tar")):
        with tarfile.open(shard) as tf:
            members = [m for m in tf.getmembers() if m.name.endswith(".png")]
        with open(shard, "r+b") as f:
            for m in members[::n]:
                f.seek(m.offset_data)
                f.write(b"\x00" * m.size)
                hit += 1
    return hit


def test_bad_samples_are_skipped_in_step_across_ranks_and_resume_exactly(digits_dir: str, tmp_path: Path) -> None:
    """Undecodable samples on 2 ranks: counted, replaced by weight-0 substitutes, ranks stay in
    step, and a resume from the step-4 checkpoint reproduces the run bit for bit."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(digits_dir, data)
    assert _corrupt_every_nth_image(data, 7) > 50
    run = tmp_path / "run"
    args = [f"data.dir={data}", f"run.dir={run}", "train.steps=12", "checkpoint.every_steps=4", "parallel.zero=2"]
    proc = torchrun(2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first = train_records(run)
    assert first[12]["data_skipped"] > 0, "bad samples were met and counted"
    assert "skipped bad sample" in proc.stderr
    shutil.rmtree(run / "checkpoints" / "step_00000008")
    reference = model_params(run / "checkpoints" / "step_00000012")
    shutil.rmtree(run / "checkpoints" / "step_00000012")
    proc = torchrun(2, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = train_records(run)
    assert [again[s]["loss"] for s in range(1, 13)] == [first[s]["loss"] for s in range(1, 13)]
    assert again[12]["data_skipped"] == first[12]["data_skipped"]
    final = model_params(run / "checkpoints" / "step_00000012")
    for name in reference:
        assert torch.equal(final[name], reference[name]), name


def test_bit_rot_in_another_ranks_file_falls_back_on_every_rank(uninterrupted: Path, digits_dir: str,
                                                                 tmp_path: Path) -> None:
    """A flipped byte in a file rank 1 wrote: the ranks verify their shares of the files, agree
    the newest checkpoint is corrupt, move it aside, resume from the previous one together and
    end bit-identical to the uninterrupted run."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted, run)
    for name in ("step_00000008", "step_00000016"):  # rank 0 picks the newest, step 24
        assert (run / "checkpoints" / name).is_dir()
    target = sorted((run / "checkpoints" / "step_00000024").glob("__1_*.distcp"))[-1]
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={run}", *EXACT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checksum mismatch" in proc.stderr and "step_00000016" in proc.stderr
    corrupt = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if "checkpoint_corrupt" in x]
    assert len(corrupt) == 1 and target.name in corrupt[0]["reason"]
    assert [p.name.split(".")[0] for p in (run / "checkpoints-aside").iterdir()] == ["step_00000024"]
    _assert_bit_identical(run, uninterrupted)


def _one_process(*args: str) -> subprocess.CompletedProcess:
    return launch("train", str(TEST_CONFIG), *COMMON, *args)


def test_one_process_zero3_is_fsdp_on_one_rank_and_resumes_exactly(digits_dir: str, tmp_path: Path) -> None:
    """ZeRO-3 in one process is FSDP2 over a 1-rank mesh (the GPU check's world-size-1 FSDP + DCP
    run needs it; before, it trained unsharded): parameters are DTensors, losses equal ZeRO-0's,
    and a run resumed from its asynchronous step-3 checkpoint repeats steps 4-6 bit for bit."""
    args = [f"data.dir={digits_dir}", "train.steps=6", "checkpoint.every_steps=3", "checkpoint.async_save=true",
            "schedule.cooldown_steps=2", "train.micro_batch_size=8"]  # accumulation: FSDP's no-sync path too
    z0, z3 = tmp_path / "zero0", tmp_path / "zero3"
    for run, zero in ((z0, 0), (z3, 3)):
        proc = _one_process(*args, f"run.dir={run}", f"parallel.zero={zero}")
        assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = train_records(z0), train_records(z3)
    assert [got[s]["loss"] for s in range(1, 7)] == [ref[s]["loss"] for s in range(1, 7)]
    probe = ("from bigtrain.config import load_config; from bigtrain.distributed import ParallelState; "
             "from bigtrain.recipes import build_parallel; from bigtrain.families import RunSpec; "
             f"cfg = load_config({str(TEST_CONFIG)!r}, ['parallel.zero=3']); ps = ParallelState.create(cfg.parallel); "
             "m = build_parallel(RunSpec.of(cfg), ps, None); "
             "print(sorted({type(p).__name__ for p in m.parameters()}), ps.world_size)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.stdout.split()[-2:] == ["['DTensor']", "1"], out.stdout + out.stderr[-2000:]
    again = tmp_path / "again"
    shutil.copytree(z3, again)
    shutil.rmtree(again / "checkpoints" / "step_00000006")
    proc = _one_process(*args, f"run.dir={again}", "parallel.zero=3")
    assert proc.returncode == 0 and "resumed from" in proc.stderr, proc.stderr[-3000:]
    resumed = train_records(again)
    assert [resumed[s]["loss"] for s in (4, 5, 6)] == [got[s]["loss"] for s in (4, 5, 6)]
    a, b = model_params(again / "checkpoints" / "step_00000006"), model_params(z3 / "checkpoints" / "step_00000006")
    assert all(torch.equal(a[k], b[k]) for k in b)


def test_consecutive_async_saves_share_one_stager_and_load(tmp_path: Path) -> None:
    """Three asynchronous saves in a row through one Checkpointer (its stager keeps the host copy
    between saves; torch 2.11's closes itself after each stage and is renewed), each of the state
    as it was when save returned, then loaded back exactly."""
    from bigtrain.checkpoint import Checkpointer, ModelState

    model = torch.nn.Linear(8, 4)
    ckpt = Checkpointer(str(tmp_path), keep_last=0)
    saved = []
    for step in (1, 2, 3):
        with torch.no_grad():
            model.weight.add_(1.0)  # the state changes between saves
        ckpt.save(step, {"model": ModelState(model)}, asynchronous=True)
        saved.append(model.weight.detach().clone())
        with torch.no_grad():
            model.weight.mul_(-1.0)  # and right after save returns: the staged copy must not see it
    ckpt.wait()
    for step, want in zip((1, 2, 3), saved):
        fresh = torch.nn.Linear(8, 4)
        ckpt.load(str(tmp_path / "checkpoints" / f"step_{step:08d}"), {"model": ModelState(fresh)})
        assert torch.equal(fresh.weight, want), step
