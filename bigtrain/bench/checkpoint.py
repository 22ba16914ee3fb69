"""Benchmark: checkpoint save/load throughput against this machine's disk bandwidth.

``python -m bigtrain.bench.checkpoint [--variant B] [--dir PATH] [--repeats 2] [--write-threads 2]``

Builds a ViT (default ViT-B/16: 86M parameters, with AdamW state ~1 GB of fp32
state in total), then measures in one run:

* the disk's sequential write bandwidth (one file of the same size, written in
  64 MiB blocks, fsynced) and read bandwidth (the same file, evicted from the page
  cache first with ``posix_fadvise(DONTNEED)``);
* plain DCP ``save`` (same writer threads, no checksums, no commit): the reference for what
  bigtrain's integrity costs;
* bigtrain's synchronous save (``Checkpointer.save``: DCP write with checksums computed in the
  writer threads + fsync + manifest + commit);
* the asynchronous save: how long the training loop is blocked (state copied to
  memory: the first save, which allocates the stager's host copy, and the best later one, which
  reuses it) and how long until the checkpoint is committed;
* the verification alone (sizes + checksum of every file, cold) and the load of model +
  optimizer state (files evicted from the page cache first; the load verifies first).

Throughputs are state bytes / seconds; ratios are against the disk numbers.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import torch
import torch.distributed.checkpoint as dcp

from bigtrain.checkpoint import Checkpointer, ModelState, OptimizerState, _single_process_ok
from bigtrain.config.core import help_text

BLOCK = 64 * 2**20


def _evict(path: str) -> None:
    """Drop a file's (or a directory's files') pages from the page cache, so reads hit the disk."""
    paths = [path] if os.path.isfile(path) else [os.path.join(path, n) for n in os.listdir(path)]
    for p in paths:
        if os.path.isfile(p):
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bandwidth(directory: str, nbytes: int) -> tuple[float, float]:
    """(write, read) bytes/s of one sequential file of ``nbytes``."""
    path = os.path.join(directory, "bandwidth.bin")
    block = os.urandom(BLOCK)  # incompressible
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        written = 0
        while written < nbytes:
            written += f.write(block)
        os.fsync(f.fileno())
    write = written / (time.perf_counter() - t0)
    _evict(path)
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(BLOCK):
            pass
    read = written / (time.perf_counter() - t0)
    os.remove(path)
    return write, read


MODEL = ["model.family=vit", "model.variant=B", "model.patch_size=16", "model.image_size=224", "data.image_size=224",
         "model.num_classes=1000"]


def build_state(overrides: list[str]) -> tuple[torch.nn.Module, torch.optim.Optimizer, int]:
    from bigtrain.config import load_config
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    model = build_model(RunSpec.of(load_config(None, [*MODEL, *overrides])))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():  # one step creates the optimizer state (exp_avg, exp_avg_sq)
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    nbytes += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
    return model, optimizer, nbytes


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                    help="config overrides of the model (default: ViT-B/16, 224 px, whose AdamW state is ~1 GB)")
    ap.add_argument("--dir", help="where to write (default: a temporary directory on the default disk)")
    ap.add_argument("--repeats", type=int, default=2, help="best of this many of each measurement")
    ap.add_argument("--write-threads", type=int, default=2, help="checkpoint.write_threads (files per rank)")
    args = ap.parse_args(argv)
    model, optimizer, nbytes = build_state(args.model)
    state = {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer)}
    gb = nbytes / 1e9
    work = tempfile.mkdtemp(prefix="bigtrain-ckpt-bench-", dir=args.dir)
    try:
        disk_w = disk_r = 0.0
        plain_s = sync_s = async_total_s = verify_s = load_s = float("inf")
        blocked: list[float] = []
        ckpt = Checkpointer(work, keep_last=1, write_threads=args.write_threads)
        for i in range(args.repeats):
            w, r = disk_bandwidth(work, nbytes)
            disk_w, disk_r = max(disk_w, w), max(disk_r, r)
            plain = os.path.join(work, "plain")
            t0 = time.perf_counter()
            with _single_process_ok():
                dcp.save(state, storage_writer=dcp.FileSystemWriter(plain, thread_count=args.write_threads), no_dist=True)
            plain_s = min(plain_s, time.perf_counter() - t0)
            shutil.rmtree(plain)
            t0 = time.perf_counter()
            path = ckpt.save(2 * i + 1, state)
            sync_s = min(sync_s, time.perf_counter() - t0)
            ckpt.wait()  # the pruned previous checkpoint is removed in the background: not in the next timing
            t0 = time.perf_counter()
            ckpt.save(2 * i + 2, state, asynchronous=True)
            blocked.append(time.perf_counter() - t0)
            ckpt.wait()
            async_total_s = min(async_total_s, time.perf_counter() - t0)
            path = ckpt.latest() or path
            _evict(path)
            t0 = time.perf_counter()
            ckpt.verify(path)
            verify_s = min(verify_s, time.perf_counter() - t0)
            _evict(path)
            t0 = time.perf_counter()
            ckpt.load(path, state)
            load_s = min(load_s, time.perf_counter() - t0)
        print(f"# {' '.join([*MODEL, *args.model])}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params; "
              f"model + AdamW state {gb:.2f} GB; {args.write_threads} write threads; directory {work}; best of {args.repeats}")
        print("| measurement | seconds | GB/s | vs disk |")
        print("|---|---|---|---|")
        print(f"| disk sequential write (fsync) | {nbytes / disk_w:.2f} | {disk_w / 1e9:.2f} | 1.00 |")
        print(f"| disk sequential read (cold) | {nbytes / disk_r:.2f} | {disk_r / 1e9:.2f} | 1.00 |")
        print(f"| plain DCP save (no checksums, no commit) | {plain_s:.2f} | {gb / plain_s:.2f} | {nbytes / plain_s / disk_w:.2f} |")
        print(f"| bigtrain sync save (checksums + commit included) | {sync_s:.2f} | {gb / sync_s:.2f} | "
              f"{nbytes / sync_s / disk_w:.2f} ({sync_s / plain_s:.2f}x plain DCP time) |")
        blocked_s = min(blocked[1:] or blocked)
        print(f"| bigtrain async save: training blocked, first save | {blocked[0]:.2f} | {gb / blocked[0]:.2f} | "
              f"{blocked[0] / sync_s:.2f} of sync |")
        print(f"| bigtrain async save: training blocked, later saves (best) | {blocked_s:.2f} | {gb / blocked_s:.2f} | "
              f"{blocked_s / sync_s:.2f} of sync |")
        print(f"| bigtrain async save: until committed | {async_total_s:.2f} | {gb / async_total_s:.2f} | "
              f"{nbytes / async_total_s / disk_w:.2f} |")
        print(f"| bigtrain verify only (sizes + checksums, cold) | {verify_s:.2f} | {gb / verify_s:.2f} | "
              f"{nbytes / verify_s / disk_r:.2f} |")
        print(f"| bigtrain load (cold), verification included | {load_s:.2f} | {gb / load_s:.2f} | "
              f"{nbytes / load_s / disk_r:.2f} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
