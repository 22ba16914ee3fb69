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
import math
import sys
import time
from typing import TYPE_CHECKING

import torch

from bigtrain.config import ConfigError
from bigtrain.config.core import help_text

if TYPE_CHECKING:
    from bigtrain.config.schema import DiffusionConfig


def _model(ckpt: str, weights: str, device: torch.device) -> tuple[torch.nn.Module, object, str]:
    from bigtrain.checkpoint.sources import model_from_checkpoint

    def denoiser(cfg: object, model: torch.nn.Module) -> None:
        if not all(hasattr(model, a) for a in ("null_class", "learn_sigma", "sample_shape")):
            raise ConfigError(f"{ckpt} holds a model.family={cfg.model.family} model, which does not denoise images")  # type: ignore[attr-defined]

    cfg, model, used = model_from_checkpoint(ckpt, "checkpoint", weights, accept=denoiser)
    return model.to(device).eval(), cfg, used


MAX_SAMPLES = 1_000_000  # a grid of more is a typo, not a picture (the score needs far fewer)


def own_grid(path: str) -> bool:
    """An earlier grid of this command: a PNG whose text chunk names bigtrain sample."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and im.info.get("Software", "").startswith("bigtrain sample")
    except (OSError, UnidentifiedImageError):
        return False


def _check_args(args: argparse.Namespace) -> torch.device:
    """Everything that can be checked before the checkpoint is read; the device to sample on."""
    import math

    from bigtrain.outputs import check_output, device_arg

    for flag, value, low in (("--n", args.n, 1), ("--steps", args.steps, 1), ("--batch", args.batch, 1)):
        if value < low:
            raise ConfigError(f"{flag} {value}: must be at least {low}")
    if args.n > MAX_SAMPLES:
        raise ConfigError(f"--n {args.n}: at most {MAX_SAMPLES:,} samples per command")
    if not math.isfinite(args.cfg) or args.cfg < 0:
        raise ConfigError(f"--cfg {args.cfg}: the guidance scale must be a finite number >= 0")
    if args.labels and not all(c.strip().lstrip("-").isdigit() for c in args.labels.split(",")):
        raise ConfigError(f"--labels {args.labels!r}: expected comma-separated class numbers, e.g. 0,3,7")
    device = device_arg(args.device)
    check_output(args.out, "--out", "file", force=args.force, sources=(args.checkpoint, args.classifier), own=own_grid)
    if not args.out.lower().endswith(".png"):
        raise ConfigError(f"--out {args.out}: the grid is written as a .png file")
    return device


def _check_against_model(args: argparse.Namespace, d: DiffusionConfig, null: int | None) -> None:
    """The arguments the checkpoint's model and objective decide: sampler, steps, classes."""
    objective, timesteps = d.objective, d.timesteps
    sampler = args.sampler if args.sampler != "auto" else ("euler" if objective == "flow" else "ddim")
    fits = {"euler": objective == "flow"}.get(sampler, objective != "flow")
    if not fits:
        raise ConfigError(f"--sampler {sampler}: the model was trained with diffusion.objective={objective}; use "
                          f"{'euler' if objective == 'flow' else 'ddim or ddpm'} (or auto)")
    if objective != "flow" and args.steps > timesteps:
        raise ConfigError(f"--steps {args.steps}: the model has {timesteps} diffusion timesteps; use at most that")
    if args.labels:
        if null is None:
            raise ConfigError("--labels: the model is unconditional")
        classes = [int(c) for c in args.labels.split(",")]
        if any(not 0 <= c < null for c in classes):
            raise ConfigError(f"--labels: classes must be in [0, {null})")


def main(argv: list[str]) -> int:
    from bigtrain.families import add_trust_argument, apply_trust_argument

    from bigtrain.diffusion.quality import SampleScorer, class_labels, save_grid, to_pixels
    from bigtrain.diffusion.sampling import SAMPLERS, generate

    ap = argparse.ArgumentParser(prog="bigtrain sample", description=help_text(__doc__), formatter_class=argparse.RawDescriptionHelpFormatter)
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
    ap.add_argument("--out", required=True, help="the grid picture (.png); an existing file only if it is an earlier "
                                                 "grid of bigtrain sample, or with --force")
    ap.add_argument("--force", action="store_true", help="replace an existing --out that is not an earlier grid")
    ap.add_argument("--progress", choices=["auto", "on", "lines", "off"], default="auto",
                    help="auto: a bar on a terminal, else a line every 30 s (as log.progress)")
    add_trust_argument(ap)
    args = ap.parse_args(argv)
    from bigtrain.metrics import Progress, setup_logging

    setup_logging(0)
    apply_trust_argument(args)
    device = _check_args(args)
    model, cfg, used = _model(args.checkpoint, args.weights, device)
    from bigtrain.families.image_diffusion import diffusion_spec, latent_codec

    d, null = cfg.diffusion, model.null_class
    _check_against_model(args, d, null)
    scorer = SampleScorer(args.classifier, cfg.data.image_size, cfg.data.channels, torch.device("cpu")) \
        if args.classifier else None  # before the sampling: a bad classifier is found in seconds, not after it
    codec = latent_codec(cfg, device)
    if args.labels:
        classes = [int(c) for c in args.labels.split(",")]
        cols = max(1, args.n // len(classes))
        labels, rows = torch.tensor(classes).repeat_interleave(cols), len(classes)
    else:
        labels, rows = class_labels(args.n, null)
    t0 = time.perf_counter()
    parts = []
    progress = Progress(math.ceil(len(labels) / args.batch) * args.steps, 0, args.progress, desc=f"sample {len(labels)}",
                        unit="step")
    for start in range(0, len(labels), args.batch):
        idx = list(range(start, min(start + args.batch, len(labels))))
        parts.append(generate(model, labels[idx], idx, model.sample_shape, objective=d.objective, prediction=d.prediction,
                              schedule=d.schedule, timesteps=d.timesteps, sampler=args.sampler, steps=args.steps,
                              guidance=args.cfg, null=null, seed=args.seed, clip=codec is None, device=device,
                              on_step=progress.update).float())
    progress.close()
    x = torch.cat(parts)
    if codec is not None:  # latent diffusion: back to pixels through the run's VAE
        x = codec.decode(x)
    pixels = to_pixels(x, cfg.data.mean, cfg.data.std)
    result = {"out": save_grid(pixels, rows, args.out), "samples": len(labels), "weights": used, "steps": args.steps,
              "cfg": args.cfg, "seed": args.seed, "seconds": round(time.perf_counter() - t0, 2)}
    if scorer is not None:
        from bigtrain.recipes import load_splits
        from data_pipeline import NoisedImageDataset, sequential_batches

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
