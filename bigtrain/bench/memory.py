"""Benchmark: the memory estimator (``bigtrain estimate``) against the measured peak.

``python -m bigtrain.bench.memory [--set fp32,bf16] [--rows NAME,...] [--steps 3]``

Each row estimates a config from its meta model (no allocation), then trains it for ``--steps``
steps in a fresh process group (``bigtrain.bench.worker``) and reads every rank's peak RSS
(on a GPU: ``torch.cuda.max_memory_allocated`` would be the measure). Printed: the estimate's
rows, the estimate and the most loaded rank's measured peak, and their ratio. Configs of several
GiB, so the runtime's own baseline (~0.4 GiB) does not dominate; never part of the test suite.

Two sets: ``fp32`` (ViT-L/4 on 32 px digits) and ``bf16`` (``train.dtype=bfloat16``: the same
ViT-L at 16 px with 8 px patches, 4 tokens per image, because bf16 matmuls on a CPU without bf16
instructions run ~80x slower than fp32; its rows check what bf16 changes: autocast's weight
copies, FSDP's bf16 gathers, unsharded gradients under accumulation, bf16 activations).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from bigtrain.bench.parallel import ROOT, run_row
from bigtrain.config.core import help_text

CONFIG = ROOT / "configs" / "vit" / "digits_tiny.yaml"
# ViT-L/4 on 32 px digits (304M parameters, 64 tokens): model states of several GiB, activations
# large enough to matter without AC
COMMON = ["model.width=1024", "model.depth=24", "model.num_heads=16", "model.mlp_dim=4096", "model.dropout=0.0", "train.global_batch_size=16", "optim.grad_clip_norm=1.0",
          "train.host_memory_release=on"]  # the estimate's accuracy is stated for this mode (docs/memory.md)
BF16 = ["model.width=1024", "model.depth=24", "model.num_heads=16", "model.mlp_dim=4096", "model.dropout=0.0",
        "data.image_size=16", "model.image_size=16", "model.patch_size=8", "train.global_batch_size=4",
        "optim.grad_clip_norm=1.0", "train.dtype=bfloat16", "train.host_memory_release=on"]
BF16_ROWS: list[tuple[str, int, list[str]]] = [
    ("bf16: 1 proc, AdamW", 1, []),
    ("bf16: dp2 ZeRO-1, adamw8bit", 2, ["parallel.zero=1", "optim.name=adamw8bit"]),
    ("bf16: dp2 ZeRO-3, AdamW, full AC", 2, ["parallel.zero=3", "parallel.activation_checkpointing=full"]),
    ("bf16: dp2 ZeRO-2, AdamW, 2 micro-batches", 2, ["parallel.zero=2", "train.micro_batch_size=1"]),
    ("bf16: tp2 + SP, factored", 2, ["parallel.tp=2", "optim.name=factored"]),
    # activations, not model states, dominate: a narrow ViT over 256 tokens per image
    ("bf16: ViT 128-wide, 256 tokens, batch 16", 1, [
        "model.width=128", "model.depth=4", "model.num_heads=4", "model.mlp_dim=512", "data.image_size=32",
        "model.image_size=32", "model.patch_size=2", "train.global_batch_size=16"]),
]
ROWS: list[tuple[str, int, list[str]]] = [
    ("1 proc, AdamW, no AC", 1, []),
    ("1 proc, AdamW, full AC, micro 16", 1, ["parallel.activation_checkpointing=full"]),
    ("dp2 ZeRO-1, adamw8bit", 2, ["parallel.zero=1", "optim.name=adamw8bit"]),
    ("dp2 ZeRO-2, AdamW", 2, ["parallel.zero=2"]),
    ("dp2 ZeRO-3, AdamW, full AC", 2, ["parallel.zero=3", "parallel.activation_checkpointing=full"]),
    ("tp2 + SP, factored", 2, ["parallel.tp=2", "optim.name=factored"]),
]


def main(argv: list[str] | None = None) -> int:
    from bigtrain.config import load_config
    from bigtrain.memory import GiB, estimate

    ap = argparse.ArgumentParser(description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", default="fp32,bf16", help="comma-separated row sets: fp32, bf16")
    ap.add_argument("--rows", default="", help="comma-separated row names (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    sets = {"fp32": (COMMON, ROWS), "bf16": (BF16, BF16_ROWS)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for set_name in args.set.split(","):
            base, rows = sets[set_name]
            common = [*base, f"data.dir={work / set_name}"]
            for name, nproc, overrides in rows:
                if args.rows and name not in args.rows.split(","):
                    continue
                cfg = load_config(CONFIG, [*common, *overrides])
                est = estimate(cfg, nproc)
                print(f"\n## {name}\n{est.table()}", flush=True)
                measured = run_row(CONFIG, common, nproc, "bigtrain", overrides, args.steps, work)
                peak = max(measured["peak_rss_mib"]) * 2**20
                results.append((name, nproc, est.total, peak))
                print(f"measured peak RSS per rank: {[round(m / 1024, 3) for m in measured['peak_rss_mib']]} GiB; "
                      f"estimate / measured = {est.total / peak:.3f}", flush=True)
    print("\n| config (ViT-L, 304M params: fp32 32 px patch 4, global batch 16; bf16 16 px patch 8, global batch 4) "
          "| ranks | estimate GiB | measured peak RSS GiB | estimate / measured |")
    print("|---|---|---|---|---|")
    for name, nproc, total, peak in results:
        print(f"| {name} | {nproc} | {total / GiB:.2f} | {peak / GiB:.2f} | {total / peak:.3f} |")
    print(f"(cores: {os.cpu_count()}, steps per row: {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
