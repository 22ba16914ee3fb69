"""GPU check: bigtrain trains, saves and resumes on one CUDA device, and how fast it is there.

``python -m bigtrain.bench.gpu [--out DIR]``  (exit 2 with one line where no CUDA device is present)

1. **Function.** For every registered model family, on its ``debug`` preset and embedded data,
   train 8 steps on the GPU in bf16 with checkpoints at steps 4 and 8, then resume a copy of the
   run from the step-4 checkpoint and compare the losses of steps 5-8 with the uninterrupted run's.
2. **Speed.** Measure the bf16 GEMM peak (8192^3 matmuls) in the same run, then train ViT-B/16
   (224 px) and a ~1B-parameter Llama (sequence 2048) in bf16 autocast with fp32 master weights,
   once with bigtrain's training step and once with a plain PyTorch loop (same model, same SDPA
   attention, eager, no compile, fused AdamW, same batch), on synthetic tensors. Reported: step
   time, samples (images or tokens) per second, MFU against the measured and the nominal bf16 peak,
   peak GPU memory. FLOPs are the family's own count (``Family.flops_per_sample``): LM FLOPs per
   token = 6 x (parameters of the matmuls: every layer's projections and the LM head, not the
   input embedding) + 12 x layers x width x sequence (attention scores and values, forward +
   backward); ViT FLOPs from its matmul count.

   Beside each row: the estimator's figure (``bigtrain estimate``: its tensors, what
   ``max_memory_allocated`` counts, and its total with the stated allowances) and the measured
   peak allocated *and* reserved memory, and which SDPA kernel ran (from the profiler's op names).
3. **FSDP + DCP on one rank.** ``parallel.zero=3`` in one process (FSDP2 over a 1-rank mesh, the
   NCCL group on the GPU) with the factored optimizer: an asynchronous save (its blocking time),
   a synchronous final save, a resume from the asynchronous one, and the optimizer's step time
   before and after that resume.

Prints the versions (torch, CUDA, NCCL, cuDNN, GPU and its memory), a markdown table and writes
``gpu_check.json`` into ``--out``. ``--device cpu --tiny`` runs the same code paths on the CPU with
tiny models (what the test suite does). Multi-GPU (NCCL) layouts cannot be checked with one GPU.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bigtrain.config.core import help_text

ROOT = Path(__file__).resolve().parents[2]
# the speed part's models: (label, overrides of a bare config, tiny overrides for the CPU smoke run)
SPEED_MODELS = [
    ("ViT-B/16 224px", ["model.family=vit", "model.variant=B", "model.image_size=224", "data.image_size=224",
                        "model.patch_size=16", "model.in_channels=3", "data.channels=3", "model.num_classes=1000",
                        "train.global_batch_size=128"],
     ["model.variant=Ti", "model.image_size=32", "data.image_size=32", "model.patch_size=8", "train.global_batch_size=8"]),
    ("Llama ~1B seq 2048", ["model.family=llama", "model.variant=1B", "model.vocab_size=32000", "model.seq_len=2048",
                            "train.global_batch_size=8"],
     ["model.variant=debug", "model.depth=2", "model.vocab_size=512", "model.seq_len=64", "train.global_batch_size=4"]),
]
# dense bf16 tensor-core peaks of the vendor's datasheets (half the "with sparsity" figures); the first
# key contained in the device name wins, so the NVL and PCIe parts come before the SXM ones
NOMINAL_BF16 = {"H100 NVL": 835.5e12, "H200 NVL": 835.5e12, "H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12,
                "A100": 312e12, "L40S": 362e12}


def nominal_peak(name: str) -> float | None:
    return next((v for k, v in NOMINAL_BF16.items() if k in name), None)


# --- 1. function: train, save, resume on the device --------------------------------------------------
def versions(device: str) -> dict[str, Any]:
    """What ran: Python, torch, CUDA, NCCL, cuDNN, the GPU and its memory, the optional packages."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(cuda=torch.version.cuda, nccl=".".join(map(str, torch.cuda.nccl.version())),
                   cudnn=torch.backends.cudnn.version(), gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   capability=f"{props.major}.{props.minor}")
    for pkg in ("transformers", "diffusers", "webdataset"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _train(family: Any, run: Path, data: Path, device: str, dtype: str, *extra: str) -> tuple[int, str]:
    config = run.parent / f"{family.name}.yaml"
    config.write_text(f"model:\n  family: {family.name}\n")
    args = [sys.executable, "-m", "bigtrain", "train", str(config), *family.debug_overrides, f"run.dir={run}", f"data.dir={data}",
            "train.steps=8", "checkpoint.every_steps=4", "checkpoint.keep_last=0", "eval.every_steps=0",
            "eval.fewshot=false", "schedule.warmup_steps=1", "schedule.cooldown_steps=2", "log.every_steps=1",
            f"parallel.device={device}", f"train.dtype={dtype}", *extra]
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    return proc.returncode, proc.stderr


def _records(run: Path, kind: str) -> dict[int, dict[str, Any]]:
    """The last record of ``kind`` per step (a resumed run rewrites the steps after its checkpoint)."""
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == kind:
            out[r["step"]] = r
    return out


def _losses(run: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in _records(run, "train").items()}


def _max_rel_diff(ref: dict[int, float], got: dict[int, float], steps: range) -> float:
    return max(abs(got[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in steps)


def function_check(work: Path, device: str, dtype: str) -> list[dict[str, Any]]:
    from bigtrain.families import all_families

    rows = []
    for family in all_families():
        name = family.name
        data, run, again = work / f"data-{name}", work / f"run-{name}", work / f"resume-{name}"
        t0 = time.perf_counter()
        rc, err = _train(family, run, data, device, dtype)
        row: dict[str, Any] = {"family": name, "trained": rc == 0, "seconds": round(time.perf_counter() - t0, 1)}
        if rc == 0:
            _restart_from_step4(run, again)
            rc, err = _train(family, again, data, device, dtype)
            resumed = rc == 0 and "resumed from" in err
            # the noise floor: a second uninterrupted run. On CUDA (SDPA and convolution backward are not
            # deterministic) two runs differ by themselves; a resume no further off than that is sound
            twin_rc, _ = _train(family, work / f"twin-{name}", data, device, dtype) if rc == 0 else (1, "")
            ref = _losses(run)
            diff, noise = (_max_rel_diff(ref, _losses(d), range(5, 9)) if ok == 0 else float("nan")
                           for d, ok in ((again, rc), (work / f"twin-{name}", twin_rc)))
            row.update(resumed=resumed, max_rel_loss_diff=diff, noise_rel_loss_diff=noise, equal=diff == 0.0,
                       within_noise=diff <= noise, final_loss=ref.get(8))
        if rc != 0:
            row["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
            # a family whose optional dependency this machine lacks (e.g. diffusers) is not a failure
            row["skipped"] = "pip install 'bigtrain[" in row["error"]
        rows.append(row)
    return rows


def _restart_from_step4(run: Path, again: Path) -> None:
    shutil.copytree(run, again)
    shutil.rmtree(again / "checkpoints" / "step_00000008")


def fsdp_check(work: Path, device: str, dtype: str) -> dict[str, Any]:
    """ZeRO-3 in one process (FSDP2 over a 1-rank mesh; NCCL on a GPU) with the factored optimizer:
    an asynchronous save at step 4, a synchronous final save, a resume from step 4."""
    from bigtrain.families import get_family

    family = get_family("vit")
    extra = ("parallel.zero=3", "optim.name=factored", "checkpoint.async_save=true")
    run, again, data = work / "fsdp", work / "fsdp-resumed", work / "data-vit"
    rc, err = _train(family, run, data, device, dtype, *extra)
    out: dict[str, Any] = {"trained": rc == 0}
    if rc == 0:
        _restart_from_step4(run, again)
        rc, err = _train(family, again, data, device, dtype, *extra)
        out["resumed"] = rc == 0 and "resumed from" in err
    if rc != 0:
        out["error"] = err.strip().splitlines()[-1] if err.strip() else f"exit {rc}"
        return out
    saves = _records(run, "checkpoint")
    first, resumed = _records(run, "train"), _records(again, "train")
    out.update(async_save_blocked_s=saves[4]["blocked_s"], async_flag=saves[4]["async"],
               final_save_blocked_s=saves[8]["blocked_s"], final_async=saves[8]["async"],
               max_rel_loss_diff=_max_rel_diff(_losses(run), _losses(again), range(5, 9)),
               # the first step of each process compiles kernels and allocates: steps 2-4 vs 6-8
               step_s_before_resume=statistics.median(first[s]["step_time_s"] for s in (2, 3, 4)),
               step_s_after_resume=statistics.median(resumed[s]["step_time_s"] for s in (6, 7, 8)))
    return out


# --- 2. speed -----------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_peak(device: torch.device, dtype: torch.dtype, n: int, iters: int = 20) -> float:
    """Best FLOP/s of n x n x n matmuls (after warm-up)."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def _cfg(overrides: list[str], tiny_overrides: list[str], tiny: bool, device: str, dtype: str) -> Any:
    from bigtrain.config import load_config

    common = [f"parallel.device={device}", f"train.dtype={dtype}", "optim.grad_clip_norm=1.0", "schedule.warmup_steps=0",
              "schedule.cooldown_steps=0", "schedule.decay=constant", "train.steps=1000", "train.micro_batch_size=0"]
    return load_config(None, [*common, *overrides, *(tiny_overrides if tiny else [])])


def _batch(cfg: Any, device: torch.device) -> dict[str, Any]:
    """One synthetic global batch of the family's shape (pinned host memory on CUDA, copied each step
    like real data)."""
    from bigtrain.families import get_family

    family = get_family(cfg.model.family)
    if family.example_batch is None:
        raise SystemExit(f"error: model.family={family.name} declares no example_batch: no speed run")
    b = cfg.train.global_batch_size
    x = family.example_batch(cfg.model, b, torch.Generator().manual_seed(0))
    if device.type == "cuda":
        x = {k: v.pin_memory() for k, v in x.items()}
    return {**x, "num_samples": b, "num_errors": 0, "errors": []}


class SyntheticStream:
    """The trainer's Stream protocol over one repeated synthetic batch."""

    def __init__(self, batch: dict[str, Any]) -> None:
        self.batch, self.consumed_samples = batch, 0

    def next_step(self) -> list[dict[str, Any]]:
        self.consumed_samples += self.batch["num_samples"]
        return [self.batch]

    def skip(self, n: int) -> None:
        self.consumed_samples += n

    def state_dict(self) -> dict[str, Any]:
        return {"consumed_samples": self.consumed_samples}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed_samples = int(state["consumed_samples"])

    def source_samples(self) -> dict[str, int]:
        return {}


def _time_steps(step: Any, device: torch.device, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def plain_loop(cfg: Any, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    """Eager PyTorch: same model and objective, fused AdamW, bf16 autocast, grad clipping."""
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, make_task
    from bigtrain.tasks.protocol import batch_to_device

    run = RunSpec.of(cfg)
    model = build_model(run).to(device)
    task = make_task(run, model)
    fused = {"fused": True} if device.type == "cuda" else {}
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, **fused)
    batch = _batch(cfg, device)
    bf16 = cfg.train.dtype == "bfloat16"

    def step() -> None:
        b = batch_to_device(batch, device)
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = task(b)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        opt.step()

    return _measure(step, model, cfg, device, warmup, steps)


def bigtrain_loop(cfg: Any, device: torch.device, warmup: int, steps: int, work: Path) -> dict[str, Any]:
    """bigtrain's own training step (Trainer.train_step) built by its recipes, on a synthetic stream."""
    from bigtrain.checkpoint import Checkpointer
    from bigtrain.distributed import ParallelState
    from bigtrain.optim import LRSchedule, build_optimizer
    from bigtrain.families import RunSpec
    from bigtrain.optim.builder import head_param_names, no_weight_decay_names
    from bigtrain.recipes import build_model, make_task, parallelize, schedule_spec
    from bigtrain.trainer import Trainer

    ps = ParallelState.create(cfg.parallel)
    run = RunSpec.of(cfg)
    with torch.device("meta"):
        full = build_model(run)
    model = parallelize(run, build_model(run).to(ps.device), ps, None)
    task = make_task(run, model)
    optimizer = build_optimizer(model, cfg.optim, no_weight_decay_names(full), head_param_names(full))
    schedule = LRSchedule(optimizer, cfg.optim.lr, schedule_spec(cfg))
    trainer = Trainer(cfg, model, task, optimizer, schedule, SyntheticStream(_batch(cfg, device)),
                      Checkpointer(str(work / "bigtrain-speed")), parallel=ps)
    return _measure(trainer.train_step, model, cfg, device, warmup, steps)


def _measure(step: Any, model: torch.nn.Module, cfg: Any, device: torch.device, warmup: int, steps: int) -> dict[str, Any]:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    from bigtrain.families import RunSpec
    from bigtrain.recipes import train_flops_per_sample

    from bigtrain.memory import GiB, estimate

    times = _time_steps(step, device, warmup, steps)
    t = statistics.median(times)
    run = RunSpec.of(cfg)
    flops = train_flops_per_sample(model, run) * cfg.train.global_batch_size
    per_sample = run.family.sample_unit(cfg.model)[1]
    out = {"step_s": t, "best_step_s": min(times), "items_per_s": cfg.train.global_batch_size * per_sample / t,
           "model_flops_per_s": flops / t}
    if device.type == "cuda":
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated(device) / GiB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved(device) / GiB
    est = estimate(cfg, 1, device.type)
    out.update(estimate_tensors_gb=est.tensors / GiB, estimate_total_gb=est.total / GiB, sdpa=sdpa_kernels(step))
    return out


def sdpa_kernels(step: Any) -> list[str]:
    """The scaled-dot-product-attention ops one more step ran (flash, efficient, cuDNN, math)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sorted({e.key.removeprefix("aten::") for e in prof.key_averages()
                   if e.key.startswith("aten::_scaled_dot_product") and "backward" not in e.key})


def speed_check(device: torch.device, tiny: bool, dtype: str, work: Path) -> dict[str, Any]:
    tdtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    peak = gemm_peak(device, tdtype, 256 if tiny else 8192)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    nominal = nominal_peak(name) if dtype == "bfloat16" else None
    rows = []
    warmup, steps = (1, 2) if tiny else (3, 10)
    for label, overrides, tiny_overrides in SPEED_MODELS:
        cfg = _cfg(overrides, tiny_overrides, tiny, device.type, dtype)
        for impl, fn in (("plain PyTorch (eager)", lambda: plain_loop(cfg, device, warmup, steps)),
                         ("bigtrain", lambda: bigtrain_loop(cfg, device, warmup, steps, work))):
            r = fn()
            r.update(model=label if not tiny else f"{cfg.model.family} (tiny)", impl=impl, mfu=r["model_flops_per_s"] / peak,
                     mfu_nominal=r["model_flops_per_s"] / nominal if nominal else None)
            rows.append(r)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for family_rows in (rows[0:2], rows[2:4]):
        family_rows[1]["speedup_vs_plain"] = family_rows[0]["step_s"] / family_rows[1]["step_s"]
    return {"device": name, "gemm_peak_flops": peak, "nominal_peak_flops": nominal, "rows": rows}


def table(function: list[dict[str, Any]], speed: dict[str, Any], fsdp: dict[str, Any], vers: dict[str, Any]) -> str:
    lines = [f"# {speed['device']}, {time.strftime('%Y-%m-%d')}; measured GEMM peak "
             f"{speed['gemm_peak_flops'] / 1e12:.1f} TFLOP/s"
             + (f", nominal {speed['nominal_peak_flops'] / 1e12:.0f}" if speed["nominal_peak_flops"] else ""),
             "", "versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()),
             "", "| family | trained 8 steps | resumed from step 4 | max rel. loss diff, steps 5-8 | noise floor (a second "
             "uninterrupted run) |", "|---|---|---|---|---|"]
    for r in function:
        lines.append(f"| {r['family']} | {r['trained']} | {r.get('resumed', False)} | {r.get('max_rel_loss_diff', 'n/a')} "
                     f"| {r.get('noise_rel_loss_diff', 'n/a')} |" + (f" {r['error']}" if "error" in r else ""))
    lines += ["", "| model | loop | step (s) | items/s | MFU (measured peak) | MFU (nominal) | peak allocated / reserved "
              "(GiB) | estimate: tensors / total (GiB) | SDPA | vs plain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in speed["rows"]:
        nominal = f"{r['mfu_nominal']:.1%}" if r.get("mfu_nominal") else "n/a"
        mem = f"{r['peak_allocated_gb']:.1f} / {r['peak_reserved_gb']:.1f}" if "peak_allocated_gb" in r else "n/a"
        vs = f"{r['speedup_vs_plain']:.2f}x" if "speedup_vs_plain" in r else ""
        lines.append(f"| {r['model']} | {r['impl']} | {r['step_s']:.4f} | {r['items_per_s']:.0f} | {r['mfu']:.1%} | {nominal} "
                     f"| {mem} | {r['estimate_tensors_gb']:.1f} / {r['estimate_total_gb']:.1f} | {', '.join(r['sdpa']) or 'none'} "
                     f"| {vs} |")
    lines += ["", "| ZeRO-3, one rank (FSDP2), factored | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in fsdp.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".", help="directory for gpu_check.json")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny models and steps (the CPU smoke test)")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device: python -m bigtrain.bench.gpu needs one NVIDIA GPU "
              "(--device cpu --tiny runs the same code paths on the CPU)", file=sys.stderr)
        return 2
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    work = Path(tempfile.mkdtemp(prefix="bigtrain-gpu-"))
    vers = versions(args.device)
    print("versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()), flush=True)
    try:
        function = function_check(work, args.device, dtype)
        fsdp = fsdp_check(work, args.device, dtype)
        speed = speed_check(torch.device(args.device, 0) if args.device == "cuda" else torch.device("cpu"),
                            args.tiny, dtype, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(table(function, speed, fsdp, vers))
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump({"function": function, "speed": speed, "fsdp": fsdp, "versions": vers, "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d")}, f, indent=1, default=str)
    ok = all((r["trained"] and r.get("resumed")) or r.get("skipped") for r in function)
    return 0 if ok and fsdp.get("resumed") else 1


if __name__ == "__main__":
    sys.exit(main())
