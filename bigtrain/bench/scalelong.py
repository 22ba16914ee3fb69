"""ScaleLong in miniature: the same UNet, data, seed and noise with plain long skips and the three
scalings, compared on stability and on sample quality.

``bigtrain bench scalelong [--steps 400] [--kappa 0.5] [--out runs/bench_scalelong]``

Each variant trains ``configs/diffusion/unet_digits.yaml`` (one process) with only
``model.skip_scaling`` changed: every variant sees the same batches, noise, timesteps and label
drops (drawn per sample from the seed and its position), so the differences are the model's.
Measured per variant:

* oscillation of the training loss, of the gradient norm and of every down/mid/up block's output
  feature norm (the paper's Fig. 1 quantity): the standard deviation, over the second half of
  training, of the series relative to its centred 21-step moving average (the trend removed, what
  is left is the step-to-step swing);
* the final training loss (mean of the last 10% of steps), the held-out denoising loss, and the
  samples' score by the digits classifier (trained first if ``--classifier`` is not given): its
  top-1 on the requested classes and the Frechet distance to the eval digits in its feature space.

Results: ``OUT/results.json`` and a Markdown table on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bigtrain.config.core import help_text

ROOT = Path(__file__).resolve().parents[3]
CONFIG = ROOT / "configs" / "diffusion" / "unet_digits.yaml"
SCORER = ROOT / "configs" / "diffusion" / "digits_scorer.yaml"
VARIANTS = ("none", "constant", "exponential", "learnable")


def oscillation(series: list[float], window: int = 21) -> float:
    """std of x / moving_average(x) - 1 over the second half (centred window, valid part only)."""
    x = np.asarray(series[len(series) // 2:], dtype=np.float64)
    if len(x) < window + 2:
        return float("nan")
    trend = np.convolve(x, np.ones(window) / window, mode="valid")
    core = x[window // 2: window // 2 + len(trend)]
    return float(np.std(core / trend - 1.0))


def _train_variant(name: str, overrides: list[str]) -> dict[str, Any]:
    from bigtrain.config import load_config
    from bigtrain.run import prepare_run

    cfg = load_config(CONFIG, overrides)
    run = prepare_run(cfg)
    trainer, metrics = run.trainer, run.metrics
    assert metrics is not None
    unet = trainer.model.unet
    layers = {f"down{i}": b for i, b in enumerate(unet.down_blocks)}
    layers.update({"mid": unet.mid_block} if unet.mid_block is not None else {})
    layers.update({f"up{i}": b for i, b in enumerate(unet.up_blocks)})
    pending: dict[str, list[float]] = {k: [] for k in layers}
    feats: dict[str, list[float]] = {k: [] for k in layers}

    def hook(key: str) -> Any:
        def record(module: torch.nn.Module, args: Any, out: Any) -> None:
            if module.training:
                h = out[0] if isinstance(out, tuple) else out
                pending[key].append(float(h.detach().float().pow(2).mean().sqrt()))
        return record

    handles = [m.register_forward_hook(hook(k)) for k, m in layers.items()]
    series: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    final_eval: dict[str, float] = {}
    log = metrics.log

    def capture(record: dict) -> None:
        if record.get("kind") == "train":
            series["loss"].append(float(record["loss"]))
            series["grad_norm"].append(float(record["grad_norm"]))
            for k in layers:  # the RMS feature of this step's micro-batches
                feats[k].append(float(np.mean(pending[k])) if pending[k] else float("nan"))
                pending[k].clear()
        elif record.get("kind") == "eval":
            final_eval.update(record)
        log(record)

    metrics.log = capture  # type: ignore[method-assign]
    trainer.fit(metrics)
    run.close()
    for h in handles:
        h.remove()
    tail = max(1, len(series["loss"]) // 10)
    feature_osc = {k: oscillation(v) for k, v in feats.items()}
    return {
        "variant": name, "steps": len(series["loss"]),
        "loss_oscillation": oscillation(series["loss"]), "grad_norm_oscillation": oscillation(series["grad_norm"]),
        "feature_oscillation_mean": float(np.nanmean(list(feature_osc.values()))),
        "feature_oscillation_max": float(np.nanmax(list(feature_osc.values()))),
        "feature_oscillation": feature_osc,
        "feature_rms_final": {k: float(np.nanmean(v[-tail:])) for k, v in feats.items()},
        "train_loss_final": float(np.mean(series["loss"][-tail:])),
        "eval_loss": final_eval.get("eval/loss"), "sample_fd": final_eval.get("eval/sample_fd"),
        "sample_top1": final_eval.get("eval/sample_top1"),
        "grad_norm_mean": float(np.mean(series["grad_norm"])),
    }


def _scorer(out: Path) -> str:
    from bigtrain.config import load_config
    from bigtrain.run import prepare_run

    cfg = load_config(SCORER, [f"run.dir={out / 'scorer'}", "resume=auto"])
    ckpt = out / "scorer" / "checkpoints" / f"step_{cfg.train.steps:08d}"
    if not ckpt.is_dir():
        run = prepare_run(cfg)
        assert run.metrics is not None
        run.trainer.fit(run.metrics)
        run.close()
    return str(ckpt)


def table(results: list[dict[str, Any]]) -> str:
    rows = ["| skip scaling | loss osc. | grad-norm osc. | feature osc. mean / max | final train loss | eval loss | "
            "sample FD | sample top-1 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        rows.append(f"| {r['label']} | {r['loss_oscillation']:.4f} | {r['grad_norm_oscillation']:.4f} | "
                    f"{r['feature_oscillation_mean']:.4f} / {r['feature_oscillation_max']:.4f} | "
                    f"{r['train_loss_final']:.4f} | {r['eval_loss']:.4f} | {r['sample_fd']:.1f} | {r['sample_top1']:.2f} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="bigtrain bench scalelong", description=help_text(__doc__.split("\n\n")[0]))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--kappa", type=float, default=0.5, help="kappa of the exponential scaling (ScaleLong's default 0.5)")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--classifier", default="", help="a digits classifier checkpoint (default: train one into OUT/scorer)")
    ap.add_argument("--out", default="runs/bench_scalelong")
    ap.add_argument("--set", action="append", default=[], help="extra key=value for every variant")
    args = ap.parse_args(argv)
    out = Path(args.out)
    os.makedirs(out, exist_ok=True)
    classifier = args.classifier or _scorer(out)
    results = []
    for name in args.variants.split(","):
        label = f"exponential kappa={args.kappa}" if name == "exponential" else \
            {"none": "none (plain)", "constant": "constant 1/sqrt(2)", "learnable": "learnable gate"}.get(name, name)
        overrides = [f"run.dir={out / name}", "resume=never", f"train.steps={args.steps}", f"model.skip_scaling={name}",
                     f"model.skip_kappa={args.kappa}", "log.every_steps=1", "eval.every_steps=0",
                     "checkpoint.save_final=false", f"diffusion.eval_classifier={classifier}", *args.set]
        result = {"label": label, **_train_variant(name, overrides)}
        results.append(result)
        (out / "results.json").write_text(json.dumps({"steps": args.steps, "kappa": args.kappa, "results": results}, indent=1))
    print(table(results))
    return 0
