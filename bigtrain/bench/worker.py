"""One benchmark row, run in each process of a layout (or alone): times training steps.

``python -m bigtrain.bench.worker --config C --mode bigtrain|eager|ddp --steps N --out R.json [key=value ...]``

* ``bigtrain``: the real trainer step (data stream, parallel layout from the overrides).
* ``eager``: plain PyTorch on one process — same model, batches and optimizer, no bigtrain
  machinery (a reference row).
* ``ddp``: ``torch.nn.parallel.DistributedDataParallel`` over all ranks (a reference row).

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
    from bigtrain.distributed import LaunchEnv, ParallelState
    from bigtrain.recipes import build_trainer

    trainer = build_trainer(cfg, ParallelState.create(cfg.parallel, LaunchEnv.detect()))
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logs = trainer.train_step()
        times.append(time.perf_counter() - t0)
        losses.append(logs["loss"])
    return times, losses


def run_reference(cfg: Any, steps: int, ddp: bool) -> tuple[list[float], list[float]]:
    """Plain PyTorch (optionally DDP): model + task + AdamW groups from bigtrain, nothing else."""
    from bigtrain.optim import LRSchedule, build_optimizer
    from bigtrain.recipes import build_model, ensure_data, load_splits, make_task, schedule_spec, train_dataset

    rank, world = 0, 1
    if ddp:
        dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
    if rank == 0:
        ensure_data(cfg)
    if ddp:
        dist.barrier()
    model = build_model(cfg)
    task = make_task(cfg, model)
    wrapped = torch.nn.parallel.DistributedDataParallel(task) if ddp else task
    optimizer = build_optimizer(model, cfg.optim)
    schedule = LRSchedule(optimizer, cfg.optim.lr, schedule_spec(cfg))
    dataset = train_dataset(cfg, load_splits(cfg)[0])
    local = cfg.train.global_batch_size // world
    times, losses = [], []
    for step in range(steps):
        t0 = time.perf_counter()  # like bigtrain's step, the timing includes reading/decoding the batch
        lo = step * cfg.train.global_batch_size + rank * local
        batch = dataset[list(range(lo, lo + local))]  # the same global order as bigtrain's stream
        optimizer.zero_grad(set_to_none=True)
        loss = wrapped(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        optimizer.step()
        schedule.step()
        times.append(time.perf_counter() - t0)
        value = loss.detach().clone()
        if ddp:
            dist.all_reduce(value)
            value /= world
        losses.append(float(value))
    return times, losses


def main(argv: list[str] | None = None) -> int:
    from bigtrain.config import load_config

    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--mode", choices=["bigtrain", "eager", "ddp"], default="bigtrain")
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
        times, losses = run_reference(cfg, args.steps, ddp=args.mode == "ddp")
    rss = [peak_rss_mib()]
    if dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, rss[0])
        rss = gathered
    if int(os.environ.get("RANK", 0)) == 0:
        timed = times[args.warmup :] or times
        step_s = statistics.median(timed)
        with open(args.out, "w") as f:
            json.dump({"step_s": step_s, "samples_per_s": cfg.train.global_batch_size / step_s,
                       "peak_rss_mib": rss, "losses": losses}, f)
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
