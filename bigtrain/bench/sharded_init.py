"""Benchmark: host memory of bringing a large model up over N ranks, with sharded initialisation
and with the whole-model build it replaces.

``python -m bigtrain.bench.sharded_init [--config configs/vit/vit_g14.yaml] [--ranks 2 8] [--whole 2]
[key=value ...]``

For each rank count, ``torchrun`` starts that many CPU/gloo processes; each sets up the mesh
(``parallel.zero=3`` unless overridden, so every rank holds 1/N of each block), builds this
rank's model the way the trainer does (``recipes.build_parallel``) and reports: its resident set
before the build (the runtime: Python, torch, the process group), its peak during the build, the
bytes of model tensors it holds afterwards, and the build's wall time. ``--whole`` names the rank
counts also run with ``parallel.sharded_init=false`` (each rank builds the whole model on the host
first); counts whose N whole copies cannot fit this machine's memory are skipped, not attempted.
Nothing is trained. Never part of the test suite (minutes; ViT-G/14 needs about 11 GiB over 8
ranks sharded).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bigtrain.bench.parallel import ROOT
from bigtrain.config.core import help_text

CONFIG = ROOT / "configs" / "vit" / "vit_g14.yaml"
MiB = 2**20


def _rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(config: str, overrides: list[str], out: str) -> None:
    """One rank: the mesh, then this rank's model, measured; rank 0 writes every rank's figures."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from bigtrain.config import load_config
    from bigtrain.distributed import LaunchEnv, ParallelState
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_parallel

    cfg = load_config(config, overrides)
    ps = ParallelState.create(cfg.parallel, LaunchEnv.detect())
    ps.barrier()
    before_now, before_peak = _rss_now(), _rss_peak()
    t0 = time.perf_counter()
    model = build_parallel(RunSpec.of(cfg), ps, None)
    wall = time.perf_counter() - t0
    tensors = list(model.parameters()) + list(model.buffers())
    held = sum((t.to_local() if isinstance(t, DTensor) else t).untyped_storage().nbytes() for t in tensors)
    total = sum(t.numel() * t.element_size() for t in tensors)
    row = {"rank": ps.rank, "runtime_mib": before_now / MiB, "runtime_peak_mib": before_peak / MiB,
           "peak_mib": _rss_peak() / MiB, "after_mib": _rss_now() / MiB, "held_mib": held / MiB,
           "model_mib": total / MiB, "build_s": wall}
    rows = [None] * ps.world_size
    dist.all_gather_object(rows, row)
    if ps.rank == 0:
        Path(out).write_text(json.dumps(rows))
    del model, torch
    ps.destroy()


def _available_bytes() -> int:
    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    return info["MemAvailable"]


def _model_bytes(config: str, overrides: list[str]) -> int:
    import torch

    from bigtrain.config import load_config
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    with torch.device("meta"):
        model = build_model(RunSpec.of(load_config(config, overrides)))
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def launch(config: Path, ranks: int, overrides: list[str], work: Path) -> list[dict]:
    out = work / f"rows_{ranks}_{time.monotonic_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
           "-m", "bigtrain.bench.sharded_init", "--worker", str(out), "--config", str(config), *overrides]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{ranks} ranks failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--whole", type=int, nargs="*", default=[2], help="rank counts also run with sharded_init=false")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args, overrides = ap.parse_known_args(argv)
    if args.worker:
        worker(args.config, overrides, args.worker)
        return 0
    overrides = ["parallel.zero=3", "train.dtype=float32", *overrides]
    print(f"{Path(args.config).name} {' '.join(overrides)}; per rank, MiB: runtime = resident before the build, "
          "peak = during it, held = model tensors this rank keeps", flush=True)
    print("| ranks | init | runtime | peak | peak - runtime | held | whole model | build s (slowest rank) |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="sharded_init_") as tmp:
        for ranks in args.ranks:
            for sharded in (True, False) if ranks in args.whole else (True,):
                mode = "sharded" if sharded else "whole"
                ov = [*overrides, f"parallel.sharded_init={str(sharded).lower()}"]
                if not sharded:
                    need = ranks * _model_bytes(args.config, ov)
                    if need > _available_bytes():
                        print(f"| {ranks} | whole | not run: {ranks} whole copies need {need / 2**30:.1f} GiB, "
                              f"{_available_bytes() / 2**30:.1f} GiB available | | | | | |")
                        continue
                rows = launch(Path(args.config), ranks, ov, Path(tmp))
                worst = max(rows, key=lambda r: r["peak_mib"])
                print(f"| {ranks} | {mode} | {worst['runtime_mib']:.0f} | {worst['peak_mib']:.0f} | "
                      f"{worst['peak_mib'] - worst['runtime_mib']:.0f} | {worst['held_mib']:.0f} | "
                      f"{worst['model_mib']:.0f} | {max(r['build_s'] for r in rows):.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
