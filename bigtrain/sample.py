"""Generate samples from a diffusion checkpoint, in one process, as a picture (and a score).

``bigtrain sample CKPT --n 64 --steps 50 --cfg 1.5 --seed 0 --out grid.png``

The model is rebuilt from the checkpoint's config (any family whose models denoise: dit, unet, ...)
and filled with the EMA weights when the run kept an EMA (``--weights model`` for the trained
ones); the objective, schedule and default sampler come from the checkpoint's ``diffusion``
section. Class-conditional models get one row per class (``--labels`` picks the classes);
``--classifier CKPT`` scores the samples (the classifier's top-1 on the requested classes and the
Frechet distance to the run's eval images in its feature space). Sample ``i`` is seeded by
(``--seed``, ``i``): the same command gives the same picture, and sample ``i`` does not change with
``--n`` or ``--batch``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bigtrain.checkpoint import CheckpointError, open_saved_config
from bigtrain.config import ConfigError


def _model(ckpt: str, weights: str, device: torch.device) -> tuple[torch.nn.Module, object, str]:
    from bigtrain.export import has_ema, load_model_state
    from bigtrain.recipes import build_model

    cfg = open_saved_config(ckpt, "checkpoint")
    with torch.device("meta"):
        model = build_model(cfg)
    if not all(hasattr(model, a) for a in ("null_class", "learn_sigma", "sample_shape")):
        raise ConfigError(f"{ckpt} holds a model.family={cfg.model.family} model, which does not denoise images")
    used = "ema" if weights != "model" and has_ema(ckpt) else "model"
    missing, _ = model.load_state_dict(load_model_state(ckpt, weights), strict=False, assign=True)
    if any(n in dict(model.named_parameters()) for n in missing):
        raise CheckpointError(f"{ckpt} lacks parameters of its model, e.g. {missing[0]}")
    if hasattr(model, "reset_buffers"):  # buffers derived from the sizes, never saved
        model.reset_buffers(torch.device("cpu"))
    unfilled = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if unfilled:
        raise CheckpointError(f"{ckpt} does not fill {unfilled[0]} of its model")
    return model.to(device).eval(), cfg, used


def main(argv: list[str]) -> int:
    from bigtrain.families import add_trust_argument, apply_trust_argument

    from bigtrain.diffusion.quality import SampleScorer, class_labels, save_grid, to_pixels
    from bigtrain.diffusion.sampling import SAMPLERS, generate

    ap = argparse.ArgumentParser(prog="bigtrain sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a complete checkpoint of a diffusion run (RUN/checkpoints/step_XXXXXXXX)")
    ap.add_argument("--n", type=int, default=64, help="number of samples (class-conditional: rounded down to whole rows)")
    ap.add_argument("--steps", type=int, default=50, help="sampler steps")
    ap.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale (1 = conditional only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sampler", choices=["auto", *SAMPLERS], default="auto", help="auto: ddim (ddpm models), euler (flow)")
    ap.add_argument("--labels", default="", help="comma-separated classes, one row each (default: every class)")
    ap.add_argument("--weights", choices=["auto", "model", "ema"], default="auto", help="auto: EMA when the run kept one")
    ap.add_argument("--classifier", default="", help="a classifier checkpoint of the data: score the samples")
    ap.add_argument("--batch", type=int, default=256, help="samples per forward")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", required=True, help="the grid picture (.png)")
    add_trust_argument(ap)
    args = ap.parse_args(argv)
    apply_trust_argument(args)
    if args.n < 1 or args.steps < 1 or args.batch < 1:
        raise ConfigError("--n, --steps and --batch must be at least 1")
    device = torch.device(args.device)
    model, cfg, used = _model(args.checkpoint, args.weights, device)
    from bigtrain.families.image_diffusion import diffusion_spec, latent_codec

    codec = latent_codec(cfg, device)
    d, null = cfg.diffusion, model.null_class
    if args.labels:
        if null is None:
            raise ConfigError("--labels: the model is unconditional")
        classes = [int(c) for c in args.labels.split(",")]
        if any(not 0 <= c < null for c in classes):
            raise ConfigError(f"--labels: classes must be in [0, {null})")
        cols = max(1, args.n // len(classes))
        labels, rows = torch.tensor(classes).repeat_interleave(cols), len(classes)
    else:
        labels, rows = class_labels(args.n, null)
    t0 = time.perf_counter()
    parts = []
    for start in range(0, len(labels), args.batch):
        idx = list(range(start, min(start + args.batch, len(labels))))
        parts.append(generate(model, labels[idx], idx, model.sample_shape, objective=d.objective, prediction=d.prediction,
                              schedule=d.schedule, timesteps=d.timesteps, sampler=args.sampler, steps=args.steps,
                              guidance=args.cfg, null=null, seed=args.seed, clip=codec is None, device=device).float())
    x = torch.cat(parts)
    if codec is not None:  # latent diffusion: back to pixels through the run's VAE
        x = codec.decode(x)
    pixels = to_pixels(x, cfg.data.mean, cfg.data.std)
    result = {"out": save_grid(pixels, rows, args.out), "samples": len(labels), "weights": used, "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 2)}
    if args.classifier:
        from bigtrain.recipes import load_splits
        from data_pipeline import NoisedImageDataset, sequential_batches

        scorer = SampleScorer(args.classifier, cfg.data.image_size, cfg.data.channels, torch.device("cpu"))
        _, eval_split = load_splits(cfg)
        real = []
        for b in sequential_batches(eval_split, None, 256, make_dataset=lambda split, order: NoisedImageDataset(
                split, order, diffusion_spec(cfg, train=False), 0, train=False, noise_shape=tuple(model.sample_shape))):
            keep = b["weight"] > 0  # a set of stored latents is decoded, like the evaluator does
            real.append(b["image"][keep] if "image" in b else codec.decode(b["latent"][keep].to(device)).cpu())
        reference = scorer.features(to_pixels(torch.cat(real), cfg.data.mean, cfg.data.std))[1]
        scores = scorer.score(pixels, labels if null is not None else None, reference)
        result.update({k: round(v, 3 if k == "fd" else 4) for k, v in scores.items()})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
