"""``bigtrain distill-logits CONFIG [key=value ...] --out DIR [--top-k K] [--batch-size B]
[--samples-per-shard M]``: run a distillation config's teacher once over the samples its training
will read and store the top-k logits per token (or per image), so the student trains from the
store (``distill.logits=DIR``) without a teacher forward per step.

The positions written are the training stream's ``[0, train.steps x train.global_batch_size)``, read
through the family's training dataset (images with their training augmentation, drawn from (data
seed, position): the record keeps both, so the student's loader replays the same crop and refuses
a store written for another order). Under torchrun the teacher is laid out as in training
(FSDP-sharded over data parallel, tensor parallel within); data-parallel ranks write different
shards. The store is written into a temporary sibling and renamed into place when complete, with
``logits.json`` recording the shape, the teacher's fingerprint and how close the sparse targets
are to the dense ones (KL(dense || rebuilt) per token, the top-k mass).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bigtrain.config import ConfigError, load_config
from bigtrain.config.core import help_text


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bigtrain distill-logits", description=help_text(__doc__.split("\n\n")[0]))
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (as for train)")
    p.add_argument("--out", required=True, help="the store directory (must not exist or be empty)")
    p.add_argument("--top-k", type=int, default=16, help="logits kept per token/image (default 16)")
    p.add_argument("--batch-size", type=int, default=0, help="teacher batch per rank (default eval.batch_size)")
    p.add_argument("--samples-per-shard", type=int, default=4096)
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    from bigtrain.components.teacher import fingerprint
    from bigtrain.distributed import ParallelState
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_teacher, data_split, ensure_data, make_task, train_dataset
    from bigtrain.run import setup_logging
    from data_pipeline.logits import LogitsMeta, write_meta

    args = _parse(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunSpec.of(cfg)
    if not run.uses_teacher or run.teacher_family is None:
        raise ConfigError(f"{args.config} has no teacher to run (task={cfg.task}, teacher.family="
                          f"{cfg.teacher.family or None}): give the distillation config with its teacher section")
    for flag, value, low in (("--top-k", args.top_k, 1), ("--samples-per-shard", args.samples_per_shard, 1),
                             ("--batch-size", args.batch_size, 0)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}" + (" (0 = eval.batch_size)" if low == 0 else ""))
    out = os.path.abspath(args.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConfigError(f"--out {args.out} exists and is not empty: the store is never written over")
    ps = ParallelState.create(cfg.parallel)
    ended = False  # on an error, leave without waiting for ranks that may never arrive
    tmp = ""
    try:
        if ps.pp > 1:
            raise ConfigError("distill-logits runs the teacher data- and tensor-parallel: parallel.pp must be 1")
        setup_logging(ps.rank)
        if ps.rank == 0:
            ensure_data(run)
        ps.barrier()
        dataset = train_dataset(run, data_split(cfg, "train"))
        teacher = build_teacher(run, ps, torch.bfloat16 if cfg.train.dtype == "bfloat16" else None)
        task = make_task(run, teacher.model, teacher.model)
        samples = cfg.train.steps * cfg.train.global_batch_size
        meta = LogitsMeta(top_k=args.top_k, items=0, vocab=0, temperature=cfg.distill.temperature, samples=samples,
                          samples_per_shard=args.samples_per_shard, seed=cfg.train.seed,
                          teacher=fingerprint(teacher.source).hex())
        tmp = _shared_tmp(out, ps)
        stats = _write_shards(task, dataset, meta, tmp, ps, args.batch_size or cfg.eval.batch_size)
        entries: list[Any] = [None] * ps.world_size if dist.is_initialized() else [stats["entries"]]
        if dist.is_initialized():
            dist.all_gather_object(entries, stats["entries"])
        if ps.rank == 0:
            meta.shards = [e for _, e in sorted(x for rank_entries in entries for x in rank_entries)]
            meta.items, meta.vocab = stats["items"], stats["vocab"]
            meta.stats = {k: v for k, v in stats.items() if k not in ("entries", "items", "vocab")}
            write_meta(tmp, meta)
            if os.path.isdir(out):
                os.rmdir(out)
            os.rename(tmp, out)
            print(f"wrote {out}: {samples} samples x {meta.items} targets, top-{meta.top_k} of {meta.vocab}; "
                  f"KL(dense || stored) per target mean {meta.stats['kl_mean']:.3g}, max {meta.stats['kl_max']:.3g}; "
                  f"top-k mass mean {meta.stats['topk_mass_mean']:.4f}; teacher {meta.stats['teacher_samples_per_s']:.1f} "
                  "samples/s")
        ps.barrier()
        ended = True
    finally:
        if not ended and ps.rank == 0 and tmp and os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)  # a failed run leaves no half store behind
        ps.destroy(together=ended)
    return 0


def _shared_tmp(out: str, ps: Any) -> str:
    """A fresh temporary sibling of ``out``, made by rank 0 and known to every rank."""
    from bigtrain.outputs import clean_partials, partial_path

    name = [partial_path(out)] if ps.rank == 0 else [None]
    if ps.rank == 0:
        clean_partials(out)  # what killed earlier runs on this host left
        shutil.rmtree(name[0], ignore_errors=True)
        os.makedirs(name[0])
    if dist.is_initialized():
        dist.broadcast_object_list(name, src=0)
    return str(name[0])


@torch.no_grad()
def _write_shards(task: Any, dataset: Any, meta: Any, tmp: str, ps: Any, batch_size: int) -> dict[str, Any]:
    """This data-parallel rank's shards (every dp-th); tensor-parallel peers run the same batches and
    only tp rank 0 writes. Every rank runs as many teacher forwards as the busiest (FSDP and TP
    collectives must pair up), repeating its last batch without writing."""
    from data_pipeline.logits import write_shard

    mine = list(range(ps.dp_rank, meta.num_shards, ps.dp))
    plan = [(j, lo, min(lo + batch_size, meta.shard_range(j)[1])) for j in mine
            for lo in range(meta.shard_range(j)[0], meta.shard_range(j)[1], batch_size)]
    counts = torch.tensor([len(plan)], device=ps.device)
    if dist.is_initialized():
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
    kl_sum = kl_max = mass_sum = 0.0
    n_items, t_forward, entries = 0, 0.0, []
    current: dict[int, list[np.ndarray]] = {}
    items = vocab = 0
    for b in range(int(counts.item())):
        j, lo, hi = plan[min(b, len(plan) - 1)] if plan else (-1, 0, min(batch_size, meta.samples))
        positions = list(range(lo, hi))
        batch = {k: v.to(ps.device) if torch.is_tensor(v) else v for k, v in dataset[positions].items()}
        if batch["num_errors"]:
            raise ConfigError(f"distill-logits read {batch['num_errors']} bad samples at positions {lo}..{hi - 1} "
                              f"({batch['errors'][0]}): the store must cover every sample the run reads")
        _sync(ps.device)  # the teacher's time alone: CUDA runs asynchronously, so wait before and after
        t0 = time.perf_counter()
        logits = task.teacher_logits(batch).float()  # (batch, items, vocab)
        _sync(ps.device)
        t_forward += time.perf_counter() - t0
        if b >= len(plan):
            continue  # a filler forward: the collectives pair up, nothing is written
        items, vocab = logits.shape[1], logits.shape[2]
        meta.items, meta.vocab = items, vocab  # the record layout needs them
        records, q_stats = _records(logits, positions, dataset, meta)
        kl_sum, kl_max = kl_sum + q_stats[0], max(kl_max, q_stats[1])
        mass_sum, n_items = mass_sum + q_stats[2], n_items + logits.shape[0] * items
        current.setdefault(j, []).append(records)
        if hi == meta.shard_range(j)[1]:
            shard = np.concatenate(current.pop(j))
            if ps.tp_rank == 0:
                entries.append((j, write_shard(tmp, meta, j, shard)))
    # on the process group's device: NCCL reduces CUDA tensors only (a CPU tensor is refused after all
    # the teacher forwards are done, and the store would never be published)
    totals = torch.tensor([kl_sum, mass_sum, n_items, t_forward], dtype=torch.float64, device=ps.device)
    peak = torch.tensor([kl_max, float(items), float(vocab)], dtype=torch.float64, device=ps.device)
    if dist.is_initialized():
        dist.all_reduce(totals)
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    n = max(totals[2].item(), 1.0)
    return {"entries": entries, "items": int(peak[1]), "vocab": int(peak[2]), "kl_mean": totals[0].item() / n,
            "kl_max": peak[0].item(), "topk_mass_mean": totals[1].item() / n,
            "teacher_samples_per_s": meta.samples / max(totals[3].item() / ps.world_size, 1e-9)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _records(logits: torch.Tensor, positions: list[int], dataset: Any, meta: Any) -> tuple[np.ndarray, tuple[float, ...]]:
    """One batch's records, and (sum, max) of KL(dense || rebuilt) per target and the top-k mass sum."""
    from bigtrain.tasks.distill import sparse_target
    from data_pipeline.logits import sample_key

    tau, k = meta.temperature, meta.top_k
    if k > logits.shape[-1]:
        raise ConfigError(f"--top-k {k} exceeds the teacher's {logits.shape[-1]} classes")
    scaled = logits / tau
    lse = torch.logsumexp(scaled, dim=-1)
    val, idx = logits.topk(k, dim=-1)
    val16 = val.half()
    rebuilt = sparse_target(val16.float(), idx, lse, logits.shape[-1], tau)
    log_p = scaled - lse[..., None]
    kl = (log_p.exp() * (log_p - rebuilt.clamp_min(1e-30).log())).sum(-1).flatten()
    mass = torch.exp(val16.float() / tau - lse[..., None]).sum(-1).flatten()
    rec = np.zeros(len(positions), dtype=meta.record)
    rec["seed"] = dataset.seed
    rec["position"] = positions
    rec["sample"] = [sample_key(*dataset.order.lookup(p)[1:]) for p in positions]
    rec["lse"] = lse.cpu().numpy()
    rec["val"] = val16.cpu().numpy()
    rec["idx"] = idx.cpu().numpy()
    return rec, (float(kl.sum()), float(kl.max()), float(mass.sum()))


if __name__ == "__main__":  # pragma: no cover
    import sys

    raise SystemExit(main(sys.argv[1:]))

