"""Benchmark: ViT-G/14 (1.917 B parameters, 224 px) taking real training steps on this machine.

``python -m bigtrain.bench.vit_g [--batch 2] [--steps 3] [--more 2] [--nproc 1] [--zero 0] [--workdir DIR]``

The shipped recipe (``configs/vit/vit_g14.yaml``: factored optimizer with bf16 momentum, fp32
master weights, full activation checkpointing) trained by the real CLI, one process, on the
embedded digits written at 224 px RGB (the recipe's input shape; the accuracy is not the point);
``--nproc N --zero 3`` trains it over N CPU/gloo ranks under ``torchrun`` instead (each rank builds
only its shards: sharded initialisation), with rank 0's peak RSS printed:

1. ``bigtrain estimate`` of the run, and the same with AdamW;
2. ``bigtrain train`` with AdamW: refused before allocation (exit 2; its peak RSS shows nothing
   was allocated);
3. DeepSpeed's own ZeRO-3 estimator on the same model, for comparison (if DeepSpeed is installed);
4. ``bigtrain train`` with the recipe for ``--steps`` steps, saving a sharded checkpoint at the end;
5. the same command resumed from it for ``--more`` steps.

Printed: step times, achieved model FLOP/s against this machine's fp32 GEMM peak (measured in the
same run), peak RSS of each training process, checkpoint size. Needs ~21 GiB of RAM and ~12 GB of
disk; never part of the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigtrain.bench.parallel import ROOT, gemm_peak_flops
from bigtrain.config.core import help_text

CONFIG = ROOT / "configs" / "vit" / "vit_g14.yaml"


def overrides(work: Path, batch: int, steps: int, zero: int = 0) -> list[str]:
    return [f"run.dir={work / 'run'}", f"data.dir={work / 'digits224'}", "data.source=digits", "data.augment=none",
            f"train.global_batch_size={batch}", "train.micro_batch_size=0", "train.dtype=float32",
            f"train.steps={steps}", "schedule.warmup_steps=1", "schedule.cooldown_steps=0", f"parallel.zero={zero}",
            "eval.every_steps=0", "eval.final=false",
            f"checkpoint.every_steps={steps}", "checkpoint.async_save=false", "checkpoint.keep_last=0", "log.every_steps=1"]


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> tuple[int, float, float]:
    """(exit code, wall seconds, the child's peak RSS in GiB: the largest of all children so far, so
    exact for the first; training runs report their own in metrics.jsonl)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # max over waited children (KiB)
    return rc, time.perf_counter() - t0, (after if after > before else float("nan")) / 2**20


def deepspeed_estimate(cfg: object) -> str:
    """DeepSpeed's ZeRO-3 model-state estimate. ``..._all_live(model)`` deduplicates parameters by
    ``data_ptr()``, which is 0 for every meta tensor (it would count one parameter), so the same
    counts it derives (total, largest layer) go to ``..._all_cold`` — without materializing 7.7 GB."""
    import torch

    try:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold
    except ImportError:
        return "DeepSpeed not installed (pip install 'bigtrain[deepspeed]')"
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    with torch.device("meta"):
        model = build_model(RunSpec.of(cfg))  # type: ignore[arg-type]
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        estimate_zero3_model_states_mem_needs_all_cold(total_params=total, largest_layer_params=largest,
                                                        num_gpus_per_node=1, num_nodes=1)
    return out.getvalue().strip()


def train_records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("kind") == "train"] if path.exists() else []


def main(argv: list[str] | None = None) -> int:
    from bigtrain.config import load_config
    from bigtrain.memory import GiB, estimate
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, train_flops_per_sample

    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=2, help="images per step")
    ap.add_argument("--steps", type=int, default=3, help="steps of the first run (checkpoint at the last)")
    ap.add_argument("--more", type=int, default=2, help="steps after resuming")
    ap.add_argument("--nproc", type=int, default=1, help="ranks (torchrun on this machine, gloo)")
    ap.add_argument("--zero", type=int, default=0, help="parallel.zero")
    ap.add_argument("--workdir", default="", help="default: a temporary directory, deleted afterwards")
    args = ap.parse_args(argv)
    cores = os.cpu_count() or 1
    peak = gemm_peak_flops(cores)
    print(f"fp32 GEMM peak, {cores} threads: {peak / 1e9:.1f} GFLOP/s", flush=True)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vit_g_"))
    work.mkdir(parents=True, exist_ok=True)
    ov = overrides(work, args.batch, args.steps, args.zero)
    cfg = load_config(CONFIG, ov)
    import torch

    run = RunSpec.of(cfg)
    with torch.device("meta"):
        model = build_model(run)
    flops = train_flops_per_sample(model, run) * 4 / 3  # full AC: forward computed twice (3 -> 4 forward-equivalents)
    n = sum(p.numel() for p in model.parameters())
    print(f"ViT-G/14: {n / 1e9:.3f} B parameters, {flops / 1e12:.2f} TFLOP per image per training step (with recompute)")
    for name in ("factored", "adamw"):
        print(f"\n## bigtrain estimate (optim.name={name})\n" +
              estimate(load_config(CONFIG, [*ov, f"optim.name={name}"]), args.nproc).table())
    print("\n## DeepSpeed ZeRO-3 estimator (model states only, 1 GPU)\n" + deepspeed_estimate(cfg), flush=True)
    launcher = [sys.executable] if args.nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // args.nproc))}
    bigtrain = [*launcher, "-m", "bigtrain", "train", str(CONFIG)]
    rc, wall, rss = run([*bigtrain, *ov, "optim.name=adamw"], work / "adamw.log", env)
    lines = (work / "adamw.log").read_text().strip().splitlines()
    refusal = next((line for line in reversed(lines) if "error:" in line), lines[-1] if lines else "")  # torchrun adds its own
    print(f"\n## AdamW: exit {rc} after {wall:.1f} s, peak RSS {rss:.2f} GiB\n" + refusal)
    results = []
    for label, steps in (("train", args.steps), ("resume", args.steps + args.more)):
        extra = ["resume=auto", f"train.steps={steps}", "resume_allow_changes=[train.steps]"] if label == "resume" else []
        rc, wall, rss = run([*bigtrain, *ov, *extra], work / f"{label}.log", env)
        recs = [r for r in train_records(work / "run") if r["step"] > (args.steps if label == "resume" else 0)]
        rss = max((r["host_peak_rss_gb"] for r in recs), default=rss)  # this process's own peak
        print(f"\n## factored, {label}: exit {rc}, {wall:.0f} s wall, peak RSS {rss:.2f} GiB", flush=True)
        if rc != 0:
            print((work / f"{label}.log").read_text()[-3000:])
            return 1
        for r in recs:
            print(f"  step {r['step']}: loss {r['loss']:.4f}, {r['step_time_s']:.1f} s, "
                  f"{flops * args.batch / r['step_time_s'] / 1e9:.1f} GFLOP/s")
        results.append((label, rss, recs))
    ckpt = work / "run" / "checkpoints" / f"step_{args.steps:08d}"
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file()) / 1e9
    steady = [r["step_time_s"] for _, _, recs in results for r in recs[1:]]  # the first step of a process warms up
    best = min(steady or [r["step_time_s"] for _, _, recs in results for r in recs])
    print(f"\ncheckpoint {ckpt.name}: {size:.2f} GB; best steady step {best:.1f} s = "
          f"{flops * args.batch / best / 1e9:.1f} GFLOP/s = {flops * args.batch / best / peak:.1%} of the GEMM peak; "
          f"peak RSS {max(r for _, r, _ in results):.2f} GiB (estimate {estimate(cfg, args.nproc).total / GiB:.2f} GiB)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
