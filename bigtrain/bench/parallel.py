"""Benchmark: bigtrain layouts vs plain PyTorch and DDP on the same model, data and batch.

``python -m bigtrain.bench.parallel [--model vit|llama] [--steps 20]``

Measures this machine's fp32 GEMM peak (torch.mm) in the same run, then trains
each row for ``--steps`` steps (first 3 untimed) and prints step time,
samples/s, per-rank peak RSS and model FLOP utilisation (achieved model FLOP/s
over the measured GEMM peak of all the cores the row used). Loss columns show
that every row computes the same training run. Rows with N ranks run one thread
per rank, single-process rows use every core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MODELS = {
    "vit": (ROOT / "configs" / "vit" / "digits_tiny.yaml", ["model.dropout=0.0"]),
    "llama": (ROOT / "configs" / "llm" / "stdlib_test.yaml", ["train.global_batch_size=32"]),
}
# name, processes, mode, overrides
ROWS = [
    ("eager PyTorch", 1, "eager", []),
    ("torch DDP", 2, "ddp", []),
    ("bigtrain 1 proc", 1, "bigtrain", []),
    ("bigtrain dp2 zero0", 2, "bigtrain", ["parallel.zero=0"]),
    ("bigtrain dp2 zero1", 2, "bigtrain", ["parallel.zero=1"]),
    ("bigtrain dp2 zero2", 2, "bigtrain", ["parallel.zero=2"]),
    ("bigtrain dp2 zero3", 2, "bigtrain", ["parallel.zero=3"]),
    ("bigtrain tp2", 2, "bigtrain", ["parallel.tp=2"]),
    ("bigtrain pp2 1f1b", 2, "bigtrain", ["parallel.pp=2", "parallel.microbatches=4"]),
]


def gemm_peak_flops(threads: int, n: int = 2048, reps: int = 10) -> float:
    """Best-of fp32 matmul throughput with ``threads`` threads (FLOP/s)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    torch.set_num_threads(old)
    return 2 * n**3 / best


def run_row(config: Path, common: list[str], nproc: int, mode: str, overrides: list[str], steps: int, work: Path) -> dict:
    out = work / f"row{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1" if nproc > 1 else str(os.cpu_count() or 1)}
    worker = ["-m", "bigtrain.bench.worker", "--config", str(config), "--mode", mode, "--steps", str(steps), "--out", str(out)]
    prefix = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    args = [*common, f"run.dir={work / 'run'}", "resume=never", *overrides]
    proc = subprocess.run([*prefix, *worker, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark row {mode} {overrides} failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--data-dir", help="shards (written if missing); default: a temporary directory")
    args = ap.parse_args(argv)
    from bigtrain.config import load_config
    from bigtrain.recipes import build_model

    config, common = MODELS[args.model]
    cores = os.cpu_count() or 1
    peak = gemm_peak_flops(cores)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = [*common, f"data.dir={args.data_dir or work / 'data'}"]
        cfg = load_config(config, common)
        with torch.device("meta"):
            model = build_model(cfg)
        flops = (model.train_flops_per_sample() if args.model == "vit"
                 else model.train_flops_per_token(cfg.model.seq_len) * cfg.model.seq_len)
        print(f"# {args.model}: {model.num_params() / 1e6:.2f}M params, {flops / 1e9:.3f} GFLOP per sample (train), "
              f"global batch {cfg.train.global_batch_size}, fp32; GEMM peak {peak / 1e9:.1f} GFLOP/s on {cores} cores")
        print(f"{'row':22s} {'step ms':>8s} {'samples/s':>10s} {'MFU':>6s} {'peak MiB/rank':>14s}  first/last loss")
        for name, nproc, mode, overrides in ROWS:
            r = run_row(config, common, nproc, mode, overrides, args.steps, work)
            mfu = flops * r["samples_per_s"] / peak
            print(f"{name:22s} {r['step_s'] * 1e3:8.1f} {r['samples_per_s']:10.1f} {mfu:6.1%} "
                  f"{max(r['peak_rss_mib']):14.0f}  {r['losses'][0]:.5f}/{r['losses'][-1]:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
