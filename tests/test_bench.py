"""The benchmark's rows compute the same training run (only their speed may differ)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_CONFIG


def run_worker(mode: str, digits_dir: str, tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / f"{mode}{len(extra)}.json"
    cmd = [sys.executable, "-m", "bigtrain.bench.worker", "--config", str(TEST_CONFIG), "--mode", mode, "--steps", "4",
           "--warmup", "1", "--out", str(out), f"data.dir={digits_dir}", f"run.dir={tmp_path / mode}", "model.dropout=0",
           "train.micro_batch_size=0", *extra]
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=300, capture_output=True)
    return json.loads(out.read_text())


def test_bench_eager_and_bigtrain_rows_train_identically(digits_dir: str, tmp_path: Path) -> None:
    eager = run_worker("eager", digits_dir, tmp_path)
    ours = run_worker("bigtrain", digits_dir, tmp_path)
    for r in (eager, ours):
        assert r["step_s"] > 0 and r["samples_per_s"] > 0 and r["peak_rss_mib"][0] > 50
    assert ours["losses"] == pytest.approx(eager["losses"], rel=1e-5)


def test_compiled_blocks_train_like_eager(digits_dir: str, tmp_path: Path) -> None:
    """parallel.compile=true (per-block torch.compile, inductor on CPU) changes speed, not the run."""
    eager = run_worker("eager", digits_dir, tmp_path)
    compiled = run_worker("bigtrain", digits_dir, tmp_path, "parallel.compile=true")
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5)


def test_checkpoint_benchmark_runs(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from bigtrain.bench.checkpoint import main

    assert main(["--model", "model.variant=Ti", "--repeats", "1", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for row in ("disk sequential write", "plain DCP save", "sync save", "training blocked", "until committed",
                "verify only", "load (cold)"):
        assert row in out
    assert list(tmp_path.iterdir()) == [], "the benchmark cleans up"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_check_refuses_without_cuda(capsys: pytest.CaptureFixture) -> None:
    from bigtrain.bench.gpu import main

    assert main([]) == 2
    assert capsys.readouterr().err.startswith("error: no CUDA device")


@pytest.mark.slow  # CI time: the benchmark's own code, run on GPU sessions
def test_gpu_check_code_paths_on_cpu(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The GPU check's own code (train/save/resume per family, GEMM peak, plain vs bigtrain loops)
    run on the CPU with tiny models; on a GPU the same paths run with the real sizes."""
    import json

    from bigtrain.bench.gpu import main

    assert main(["--device", "cpu", "--tiny", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    from bigtrain.families import family_names

    assert [r["family"] for r in report["function"]] == family_names()  # every registered family
    assert all(r["resumed"] and r["equal"] for r in report["function"]), "resumed losses equal the uninterrupted run's"
    rows = report["speed"]["rows"]
    assert [r["impl"] for r in rows] == ["plain PyTorch (eager)", "bigtrain"] * 2
    assert all(r["step_s"] > 0 and 0 < r["mfu"] for r in rows)
    assert all(r["estimate_tensors_gb"] > 0 and r["sdpa"] for r in rows), "estimate and SDPA kernel beside each row"
    fsdp = report["fsdp"]  # ZeRO-3 in one process: FSDP2 on a 1-rank mesh, async save, resume
    assert fsdp["resumed"] and fsdp["async_flag"] and fsdp["async_save_blocked_s"] > 0, fsdp
    assert fsdp["step_s_before_resume"] > 0 and fsdp["step_s_after_resume"] > 0
    assert report["versions"]["torch"] == torch.__version__
    assert "| vit (tiny) | bigtrain |" in capsys.readouterr().out


def test_nominal_peaks_tell_the_nvl_parts_from_the_sxm_ones() -> None:
    from bigtrain.bench.gpu import nominal_peak

    assert nominal_peak("NVIDIA H100 NVL") == nominal_peak("NVIDIA H200 NVL") == 835.5e12
    assert nominal_peak("NVIDIA H100 80GB HBM3") == nominal_peak("NVIDIA H200") == 989e12
    assert nominal_peak("NVIDIA H100 PCIe") == 756e12 and nominal_peak("cpu") is None
