"""One benchmark row, run in each process of a layout (or alone): times training steps.

``python -m bigtrain.bench.worker --config C --mode bigtrain|eager|ddp|deepspeed1|deepspeed2|deepspeed3 --steps N --out R.json [key=value ...]``

* ``bigtrain``: the real trainer step (data stream, parallel layout from the overrides).
* ``eager``: plain PyTorch on one process — same model, batches and optimizer, no bigtrain
  machinery (a reference row).
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over all ranks (a reference row).
* ``deepspeed1|2|3``: a DeepSpeed engine with that ZeRO stage over all ranks (the peer), fp32,
  wrapping the same torch AdamW (``zero_allow_untested_optimizer``: no fused-Adam JIT build).

Every mode clips gradients at ``optim.grad_clip_norm`` so losses are comparable.
Rank 0 writes median step time, samples/s, each rank's peak RSS and the losses.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from typing import Any

import torch
import torch.distributed as dist


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run_bigtrain(cfg: Any, steps: int) -> tuple[list[float], list[float]]:
    from bigtrain.run import prepare_run

    trainer = prepare_run(cfg, training=False).trainer
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logs = trainer.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(logs["loss"])
    return times, losses


def deepspeed_engine(task: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: Any, stage: int, world: int) -> Any:
    """DeepSpeed's engine over ``task`` with the given ZeRO stage, configured like the bigtrain run."""
    import deepspeed

    config = {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.global_batch_size // world,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.optim.grad_clip_norm,  # DeepSpeed clips at 1.0 unless told
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    engine, *_ = deepspeed.initialize(model=task, optimizer=optimizer, config=config, dist_init_required=False)
    return engine


def run_reference(cfg: Any, steps: int, mode: str) -> tuple[list[float], list[float]]:
    """Plain PyTorch, DDP or DeepSpeed: model + task + AdamW groups from bigtrain, nothing else."""
    from bigtrain.optim import LRSchedule, build_optimizer
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, ensure_data, load_splits, make_task, schedule_spec, train_dataset

    run = RunSpec.of(cfg)
    rank, world = 0, 1
    if mode != "eager":
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        ensure_data(run)
    if world > 1:
        dist.barrier()
    model = build_model(run)
    task = make_task(run, model)
    optimizer = build_optimizer(model, cfg.optim)
    # built before DeepSpeed wraps the optimizer: it keeps these param-group dicts, so the LR we set lands
    schedule = LRSchedule(optimizer, cfg.optim.lr, schedule_spec(cfg))
    engine = deepspeed_engine(task, optimizer, cfg, int(mode[-1]), world) if mode.startswith("deepspeed") else None
    wrapped = torch.nn.parallel.DistributedDataParallel(task) if mode == "ddp" else task
    dataset = train_dataset(run, load_splits(cfg)[0])
    local = cfg.train.global_batch_size // world
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()  # like bigtrain's step, the timing includes reading/decoding the batch
        lo = step * cfg.train.global_batch_size + rank * local
        batch = dataset[list(range(lo, lo + local))]  # the same global order as bigtrain's stream
        if engine is not None:
            loss = engine(batch)["loss"]
            engine.backward(loss)
            engine.step()  # clips at gradient_clipping, steps, zeroes gradients
        else:
            optimizer.zero_grad(set_to_none=True)
            loss = wrapped(batch)["loss"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
            optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - t0)
        value = loss.detach().clone()
        if world > 1:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return times, losses


def main(argv: list[str] | None = None) -> int:
    from bigtrain.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["bigtrain", "eager", "ddp", "deepspeed1", "deepspeed2", "deepspeed3"], default="bigtrain")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3, help="steps excluded from the timing")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, [*args.overrides, f"train.steps={max(args.steps, 10)}", "schedule.warmup_steps=1",
                                    "schedule.cooldown_steps=0"])
    if args.mode == "bigtrain":
        times, losses = run_bigtrain(cfg, args.steps)
    else:
        times, losses = run_reference(cfg, args.steps, args.mode)
    rss = [peak_rss_mib()]
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rss[0])
        rss = gathered
    if int(os.environ.get("RANK", 0)) == 0:
        timed = times[args.warmup :] or times
        step_s = statistics.median(timed)
        with open(args.out, "w") as f:
            json.dump({"step_s": step_s, "samples_per_s": cfg.train.global_batch_size / step_s, "times": timed,
                       "peak_rss_mib": rss, "losses": losses}, f)
    if dist.is_initialized():
        dist.barrier()
        if args.mode.startswith("deepspeed"):
            # DeepSpeed's CPU shared-memory communicator can abort the process during interpreter
            # teardown ("terminate called without an active exception"); the row is complete here.
            sys.stdout.flush()
            os._exit(0)
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
