"""The memory estimator: model-state rows follow the ZeRO paper's formulas and the optimizers' declared
state, activations come from a meta-device profile, `bigtrain estimate` prints them, and `bigtrain
train` refuses a run that cannot fit before allocating anything. (Its accuracy against measured peaks
is a benchmark: python -m bigtrain.bench.memory, docs/memory.md.)"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TEST_CONFIG
from bigtrain.config import load_config
from bigtrain.families import RunSpec
from bigtrain.memory import estimate, profile_activations

# ViT-B-sized trunk on 32 px digits: large enough that rounding is invisible, cheap on meta
BASE = ["model.width=768", "model.depth=4", "model.num_heads=12", "model.mlp_dim=3072", "train.global_batch_size=32",
        "train.micro_batch_size=0",
        "model.dropout=0.0"]


def _states(cfg_overrides: list[str], world: int) -> tuple[dict, int]:
    cfg = load_config(TEST_CONFIG, [*BASE, *cfg_overrides])
    from bigtrain.recipes import build_model

    with torch.device("meta"):
        n = sum(p.numel() for p in build_model(RunSpec.of(cfg)).parameters())
    return estimate(cfg, world).rows, n


def test_model_states_follow_the_zero_formulas() -> None:
    """fp32 AdamW: 16 bytes/param on one rank; ZeRO-3 over 4 ranks divides all of it, ZeRO-2 the gradients and
    state, ZeRO-1 the state (the paper's stages, with 4-byte masters and gradients)."""
    rows, n = _states([], 1)
    assert rows["parameters (fp32)"] == rows["gradients (fp32)"] == 4 * n
    assert rows["optimizer state (adamw)"] == 8 * n
    rows3, _ = _states(["parallel.zero=3"], 4)
    states3 = rows3["parameters (fp32)"] + rows3["gradients (fp32)"] + rows3["optimizer state (adamw)"]
    assert states3 == pytest.approx(16 * n / 4, rel=0.01)  # first FSDP chunks round up
    rows1, _ = _states(["parallel.zero=1"], 4)
    assert rows1["parameters (fp32)"] == 4 * n and rows1["optimizer state (adamw)"] == pytest.approx(8 * n / 4, rel=0.05)
    assert rows1["gradient all-reduce buckets"] == 4 * n
    rows_tp, _ = _states(["parallel.tp=2"], 2)
    assert 2 * n < rows_tp["parameters (fp32)"] < 4 * n  # block matrices halved; embeddings, norms and head whole
    # pipeline: the rank with the most parameters; ZBV gives each rank two stages (rank 0: blocks 0 and 3)
    rows_pp, _ = _states(["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.microbatches=4"], 2)
    assert 1.5 * n < rows_pp["parameters (fp32)"] < 2.5 * n


def test_optimizer_state_rows() -> None:
    """Per parameter: 8-bit AdamW ~2.03 bytes (fp32 for < 2-D / small tensors), factored ~2 (bf16 momentum)
    plus row/column statistics, SGD with momentum 4."""
    rows8, n = _states(["optim.name=adamw8bit"], 1)
    rowsf, _ = _states(["optim.name=factored"], 1)
    rows_sgd, _ = _states(["optim.name=sgd"], 1)
    assert 2.0 * n < rows8["optimizer state (adamw8bit)"] < 2.1 * n
    assert 2.0 * n < rowsf["optimizer state (factored)"] < 2.1 * n
    assert rows_sgd["optimizer state (sgd)"] == 4 * n


def test_activation_profile_and_checkpointing() -> None:
    """The meta profile scales with the micro-batch; full AC keeps block inputs plus one block; TP + SP
    divides block activations; nothing is allocated (the profile runs on meta)."""
    cfg = load_config(TEST_CONFIG, BASE)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run = RunSpec.of(cfg)
    p8, p16 = profile_activations(run, 8), profile_activations(run, 16)
    assert p8.blocks == 4 and p8.block_saved > p8.block_input > 0
    assert p16.block_saved == pytest.approx(2 * p8.block_saved, rel=0.01)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 50 * 1024  # KiB: no model was allocated
    full = estimate(load_config(TEST_CONFIG, [*BASE, "parallel.activation_checkpointing=full"]), 1).rows["activations"]
    none = estimate(cfg, 1).rows["activations"]
    assert full < none / 2
    tp_sp = estimate(load_config(TEST_CONFIG, [*BASE, "parallel.tp=2"]), 2).rows["activations"]
    assert tp_sp < 0.6 * none


def test_estimate_cli_and_refusal(tmp_path, digits_dir: str) -> None:
    """`bigtrain estimate --json` for the ViT-G recipe (factored fits in less than AdamW); `bigtrain train`
    of a run whose activations cannot fit exits 2 with the estimate and the keys, before allocating;
    train.memory_check=false skips the check."""
    g14 = ROOT / "configs" / "vit" / "vit_g14.yaml"
    out = {}
    for name in ("factored", "adamw"):
        proc = subprocess.run([sys.executable, "-m", "bigtrain", "estimate", str(g14), f"optim.name={name}",
                               "train.global_batch_size=2", "--world-size", "1", "--json"],
                              capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        out[name] = json.loads(proc.stdout)
    assert out["factored"]["total"] < out["adamw"]["total"] - 10 * 2**30  # AdamW: +6 bytes/param on 1.9 B
    assert set(out["factored"]["rows"]) >= {"parameters (fp32)", "gradients (fp32)", "activations", "runtime baseline"}
    huge = [f"data.dir={digits_dir}", f"run.dir={tmp_path / 'run'}", "model.width=512", "model.mlp_dim=2048",
            "model.num_heads=8", "train.global_batch_size=65536", "train.micro_batch_size=0", "train.steps=8"]
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(TEST_CONFIG), *huge],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "exceeds" in error[0] and "train.memory_check=false" in error[0]
    assert "activations" in error[0] and not (tmp_path / "run" / "checkpoints").exists()
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "estimate", str(TEST_CONFIG), *huge],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0 and "does NOT fit" in proc.stdout


ALLOC = """
import sys, torch
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) / 1024
if sys.argv[1] == '1':
    from bigtrain.memory import release_freed_host_memory
    release_freed_host_memory()
big = torch.ones(24 * 2**20 // 4); del big              # a freed 24 MiB block raises glibc's mmap threshold
temps = [torch.ones(8 * 2**20 // 4) for _ in range(16)]  # 128 MiB of 8 MiB temporaries (an optimizer's)
keep = torch.ones(1024)                                   # allocated after them, still alive
before = rss(); del temps
print(before - rss())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_temporaries_leave_rss() -> None:
    """Without the fixed mmap threshold glibc keeps freed 8 MiB temporaries resident (heap holes under a
    live block); with it (train.host_memory_release, on for CPU runs whose estimate exceeds half of the
    memory per rank) all 128 MiB go back to the OS."""
    env = {k: v for k, v in __import__("os").environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    freed = {}
    for mode in ("0", "1"):
        proc = subprocess.run([sys.executable, "-c", ALLOC, mode], capture_output=True, text=True, cwd=ROOT,
                              timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        freed[mode] = float(proc.stdout.split()[-1])
    assert freed["1"] >= 127 and freed["0"] < 100, freed


def test_host_memory_release_only_where_memory_is_tight() -> None:
    """auto: only CPU runs whose estimate exceeds half of the memory per rank pay the page faults (the
    default job's steps are 31% slower with the fixed threshold)."""
    from bigtrain.memory import MemoryEstimate, releases_host_memory

    est = MemoryEstimate(1, {}, {"parameters (fp32)": 6 * 2**30}, device_bytes=10 * 2**30)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert releases_host_memory("auto", est, cpu) and not releases_host_memory("auto", est, cuda)
    est.device_bytes = 24 * 2**30
    assert not releases_host_memory("auto", est, cpu) and not releases_host_memory("auto", None, cpu)
    assert releases_host_memory("on", None, cpu) and not releases_host_memory("off", est, cpu)


def test_estimate_of_a_cluster_run_on_a_small_host_is_not_compared_with_its_ram(capsys: pytest.CaptureFixture) -> None:
    """64 CPU ranks cannot share this host: the estimate says so instead of dividing its RAM by 64."""
    from bigtrain.cli import _main

    assert _main(["estimate", str(TEST_CONFIG), "train.global_batch_size=64", "train.micro_batch_size=1", "--world-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "not compared: 64 ranks cannot all run on this" in out and "does NOT fit" not in out
    assert _main(["estimate", str(TEST_CONFIG), "train.global_batch_size=64", "train.micro_batch_size=1", "--world-size", "64",
                  "--ranks-per-node", "1"]) == 0
    assert "fits:" in capsys.readouterr().out
