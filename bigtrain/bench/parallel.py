"""Benchmark: bigtrain layouts vs plain PyTorch, DDP and DeepSpeed on the same model, data and batch.

``python -m bigtrain.bench.parallel [--model vit|llama] [--steps 20] [--repeats 2] [--rows zero1,DeepSpeed]``

Measures this machine's fp32 GEMM peak (torch.mm, sampled before every row, best
sample kept) in the same run, then trains each row for ``--steps`` steps (first 3
untimed), ``--repeats`` times interleaved, and prints the best and median step time,
samples/s and model FLOP utilisation at the best step (model FLOP/s over the GEMM
peak of all the machine's cores), and per-rank peak RSS. The loss column shows
that every row computes the same training run; a second table prints the
speed-up and memory ratio of each bigtrain row against its peer (DDP for
ZeRO-0, DeepSpeed for ZeRO-1/2/3, eager PyTorch for one process). Rows with N
ranks run one thread per rank, single-process rows use every core.
DeepSpeed rows need ``pip install 'bigtrain[deepspeed]'``; its first use JIT-builds
a small C++ op (about a minute, cached in ``TORCH_EXTENSIONS_DIR``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bigtrain.config.core import help_text

ROOT = Path(__file__).resolve().parents[2]
# Small but not toy-sized models: GEMMs big enough that the rows measure the trainer, not
# Python overhead. ViT: 3.1M params, 64 tokens per 32x32 digit. LM: 3.3M params, 128 tokens.
MODELS = {
    "vit": (ROOT / "configs" / "vit" / "digits_tiny.yaml",
            ["model.dropout=0.0", "model.width=192", "model.depth=6", "model.num_heads=4", "model.mlp_dim=768",
             "train.global_batch_size=64", "optim.lr=5e-4"]),
    "llama": (ROOT / "configs" / "llm" / "stdlib_test.yaml",
              ["model.width=256", "model.depth=4", "model.num_heads=4", "model.num_kv_heads=2", "model.mlp_dim=768",
               "model.seq_len=128", "train.global_batch_size=32"]),
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
    ("DeepSpeed zero1", 2, "deepspeed1", []),
    ("DeepSpeed zero2", 2, "deepspeed2", []),
    ("DeepSpeed zero3", 2, "deepspeed3", []),
]
# (bigtrain row, peer row) pairs whose step time and memory ratios are printed
PAIRS = [("bigtrain dp2 zero0", "torch DDP"), ("bigtrain 1 proc", "eager PyTorch")] + [
    (f"bigtrain dp2 zero{k}", f"DeepSpeed zero{k}") for k in (1, 2, 3)]


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
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="vit")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="run the row list this many times (interleaved); "
                    "each row is judged on its fastest step over all repeats, which damps noise from other load")
    ap.add_argument("--data-dir", help="shards (written if missing); default: a temporary directory")
    ap.add_argument("--rows", default="", help="comma-separated substrings: run only rows whose name contains one")
    args = ap.parse_args(argv)
    rows = [r for r in ROWS if not args.rows or any(k.strip() in r[0] for k in args.rows.split(","))]
    if importlib.util.find_spec("deepspeed") is None:
        print("# deepspeed not installed (pip install 'bigtrain[deepspeed]'): its rows are skipped")
        rows = [r for r in rows if not r[2].startswith("deepspeed")]
    config, common = MODELS[args.model]
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        common = [*common, f"data.dir={args.data_dir or work / 'data'}"]
        flops, batch = describe_model(args.model, config, common, cores)
        # This shared machine's speed drifts with other load (GEMM samples ranged 77-181
        # GFLOP/s within one run, on time scales of seconds), which makes medians of rows
        # run minutes apart incomparable. Rows are therefore compared on their fastest step
        # over all repeats (like timeit's best-of), and MFU is against the best GEMM sample.
        results: dict[str, dict] = {}
        peaks: list[float] = []
        for _ in range(args.repeats):
            for name, nproc, mode, overrides in rows:
                peaks.append(gemm_peak_flops(cores))
                print(f"# running: {name}", file=sys.stderr, flush=True)
                r = run_row(config, common, nproc, mode, overrides, args.steps, work)
                r["best_s"] = min(r["times"])
                if name in results:  # keep every repeat's steps: best and median over all of them
                    r["times"] += results[name]["times"]
                    r["best_s"] = min(r["best_s"], results[name]["best_s"])
                r["step_s"] = statistics.median(r["times"])
                r["samples_per_s_best"] = batch / r["best_s"]
                results[name] = r
        print(f"# fp32 GEMM peak: best of {len(peaks)} samples {max(peaks) / 1e9:.1f} GFLOP/s "
              f"(lowest {min(peaks) / 1e9:.1f}); MFU = model FLOP/s at the best step / GEMM peak")
        for r in results.values():
            r["mfu"] = flops * r["samples_per_s_best"] / max(peaks)
        print_rows(results, flops)
        print_ratios(results)
    return 0


def describe_model(model_name: str, config: Path, common: list[str], cores: int) -> tuple[float, int]:
    """Print the model line; return training FLOPs per sample (forward + backward) and the global batch."""
    from bigtrain.config import load_config
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, num_params, train_flops_per_sample

    cfg = load_config(config, common)
    run = RunSpec.of(cfg)
    with torch.device("meta"):
        model = build_model(run)
    flops = train_flops_per_sample(model, run)
    print(f"# {model_name}: {num_params(model) / 1e6:.2f}M params, {flops / 1e9:.3f} GFLOP per sample (train), "
          f"global batch {cfg.train.global_batch_size}, fp32, {cores} cores")
    return flops, cfg.train.global_batch_size


def print_rows(results: dict[str, dict], flops: float) -> None:
    ref = results.get("eager PyTorch", next(iter(results.values())))["losses"]
    print(f"| {'row':22s} | best step ms | median step ms | samples/s (best) | MFU | {'peak MiB/rank':>14s} "
          f"| last loss | max rel loss diff vs {'eager' if 'eager PyTorch' in results else 'first row'} |")
    print(f"|{'-' * 24}|-------------:|---------------:|-----------------:|-----:|{'-' * 16}|-----------|"
          "--------------------------------|")
    for name, r in results.items():
        diff = max(abs(x - y) / abs(y) for x, y in zip(r["losses"], ref, strict=True))
        print(f"| {name:22s} | {r['best_s'] * 1e3:12.1f} | {r['step_s'] * 1e3:14.1f} | {r['samples_per_s_best']:16.1f} | "
              f"{r['mfu']:4.1%} | {max(r['peak_rss_mib']):14.0f} | {r['losses'][-1]:9.5f} | {diff:30.1e} |", flush=True)


def print_ratios(results: dict[str, dict]) -> None:
    """Speed-up of bigtrain over its peer (best step and median step) and memory ratio."""
    pairs = [(a, b) for a, b in PAIRS if a in results and b in results]
    if not pairs:
        return
    print(f"\n| {'bigtrain row':22s} | {'peer row':16s} | speed-up (best step) | speed-up (median) | memory ratio |")
    print(f"|{'-' * 24}|{'-' * 18}|---------------------:|------------------:|-------------:|")
    for a, b in pairs:
        ra, rb = results[a], results[b]
        print(f"| {a:22s} | {b:16s} | {rb['best_s'] / ra['best_s']:19.2f}x | {rb['step_s'] / ra['step_s']:16.2f}x | "
              f"{max(ra['peak_rss_mib']) / max(rb['peak_rss_mib']):11.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
