"""Benchmark: AdamW, 8-bit AdamW and the factored optimizer on the default job, in one run.

``python -m bigtrain.bench.optim [--seeds 0,1,2] [--optimizers adamw,adamw8bit,factored]``

For each optimizer: its state bytes per parameter, measured on the default job's model after one
step (tensors it keeps in fp32 reported separately), then the default job
(``configs/vit/digits_tiny.yaml``, same LR and weight-decay keys for all) trained once per seed by the
real CLI: median step time relative to AdamW's and final test top-1 (mean and spread over seeds).
Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bigtrain.bench.parallel import ROOT
from bigtrain.config.core import help_text

CONFIG = ROOT / "configs" / "vit" / "digits_tiny.yaml"


def state_bytes(name: str) -> tuple[float, float, float]:
    """After one step on the default job's model: (state bytes per parameter overall, per parameter of the
    tensors whose state is compact — quantized or factored, < 4 B each —, fraction of parameters in the
    other tensors: small ones with fp32 state, AdamW's 8 B)."""
    from bigtrain.config import load_config
    from bigtrain.optim import build_optimizer
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model

    cfg = load_config(CONFIG, [f"optim.name={name}"])
    model = build_model(RunSpec.of(cfg))
    opt = build_optimizer(model, cfg.optim)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    total = compact = compact_n = fp32_n = 0
    for p in model.parameters():
        st = {k: v for k, v in opt.state[p].items() if k != "step" and torch.is_tensor(v)}
        nbytes = sum(v.numel() * v.element_size() for v in st.values())
        total += nbytes
        if nbytes < 4 * p.numel():  # quantized or factored
            compact, compact_n = compact + nbytes, compact_n + p.numel()
        else:
            fp32_n += p.numel()
    n = sum(p.numel() for p in model.parameters())
    return total / n, compact / max(compact_n, 1), fp32_n / n


def train(name: str, seed: int, work: Path) -> dict:
    run = work / f"{name}-{seed}"
    proc = subprocess.run([sys.executable, "-m", "bigtrain", "train", str(CONFIG), f"optim.name={name}",
                           f"train.seed={seed}", f"run.dir={run}", f"data.dir={work / 'digits'}"],
                          capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    step_times = [r["step_time_s"] for r in records if r.get("kind") == "train"]
    final = [r for r in records if r.get("kind") == "eval"][-1]
    return {"top1": final["eval/top1"], "step_s": statistics.median(step_times[1:] or step_times)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--optimizers", default="adamw,adamw8bit,factored")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.optimizers.split(",")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            runs = [train(name, s, Path(tmp)) for s in seeds]
            rows[name] = (state_bytes(name), runs)
            print(name, rows[name], flush=True)
    base = statistics.mean(r["step_s"] for r in rows[names[0]][1])
    print(f"\n| optimizer | state bytes/param (all) | bytes/param of compact tensors | params with >= 4 B/param state | "
          f"step time vs {names[0]} | test top-1, mean of {len(seeds)} seeds (min-max) |")
    print("|---|---|---|---|---|---|")
    for name, ((total, compact, fp32), runs) in rows.items():
        top1 = [r["top1"] for r in runs]
        step = statistics.mean(r["step_s"] for r in runs)
        print(f"| {name} | {total:.3f} | {compact:.3f} | {fp32:.1%} | {step / base:.2f}x | "
              f"{statistics.mean(top1):.4f} ({min(top1):.4f}-{max(top1):.4f}) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
