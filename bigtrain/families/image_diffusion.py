"""Building blocks for families that denoise images (DiT, UNet, a user's own): the training
data with per-sample noise, the denoising task, the evaluator with sample grids, a synthetic batch
and the cross-section checks. A model plugs in by being called ``model(x, t, y)`` and exposing
``null_class``, ``learn_sigma`` and ``sample_shape`` (see :class:`bigtrain.eval.diffusion.DiffusionEvaluator`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError, doc
from bigtrain.config.registry import ModelConfig
from bigtrain.families.image_classification import check_image_keys, image_spec

if TYPE_CHECKING:  # imported on use: the families' __init__ modules import this one light
    from torch import nn

    from bigtrain.config import Config
    from bigtrain.eval.context import EvalContext
    from bigtrain.eval.diffusion import DiffusionEvaluator
    from bigtrain.tasks.diffusion import DiffusionTask
    from data_pipeline import ImageSpec, NoisedImageDataset, SplitInfo

log = logging.getLogger(__name__)


@dataclass
class ImageDiffusionConfig(ModelConfig):
    """The ``model.*`` keys every image-denoising family shares: the images and classes, and the
    VAE of latent diffusion."""

    image_size: int = doc(32, "Side of the images (must equal data.image_size).", gt=0)
    in_channels: int = doc(1, "Channels of the images (must equal data.channels).", gt=0)
    num_classes: int = doc(10, "Class labels (plus a null class for classifier-free guidance); 0 = unconditional.", ge=0)
    vae: str = doc("", "Latent diffusion: a local diffusers AutoencoderKL directory (save_pretrained; never "
                   "downloaded) whose latents the model denoises (image_size / 2^(levels-1) a side, latent_channels "
                   "deep); data must be normalised to [-1, 1]. '' = pixel space.")
    latent_scale: float = doc(0.0, "Latent scaling factor (SD's 0.18215); 0 = the VAE config's scaling_factor.", ge=0)
    latent_channels: int = doc(0, "Latent channels of model.vae (SD: 4); 0 = read from its config.json. Set with "
                               "latent_factor, the config resolves without the VAE at hand; the run checks them.", ge=0)
    latent_factor: int = doc(0, "Image side / latent side of model.vae (SD: 8); 0 = read from its config.json.", ge=0)


ANY_LABEL = 2**31 - 1  # unconditional models read whatever labels the data has, and ignore them
_CODECS: dict[tuple[str, float, str], Any] = {}  # one frozen VAE per process and device


def denoised_shape(m: Any) -> tuple[int, int]:
    """(channels, side) of what a model section's network denoises: the image, or its VAE latents."""
    if not m.vae:
        return m.in_channels, m.image_size
    from bigtrain.diffusion.latent import latent_spec

    if m.latent_channels and m.latent_factor:  # declared: the VAE itself is checked when the run loads it
        channels, factor = m.latent_channels, m.latent_factor
    else:
        spec = latent_spec(m.vae, m.latent_scale)
        channels, factor = spec.channels, spec.factor
    if m.image_size % factor:
        raise ConfigError(f"config key 'model.image_size' ({m.image_size}) must be divisible by the VAE's downsampling "
                          f"factor {factor} ({m.vae})")
    return channels, m.image_size // factor


def latent_codec(cfg: Config, device: Any) -> Any:
    """The run's frozen VAE on ``device`` (None in pixel space), loaded once per process."""
    m = cfg.model
    if not m.vae:
        return None
    key = (m.vae, m.latent_scale, str(device))
    if key not in _CODECS:
        from bigtrain.diffusion.latent import LatentCodec

        codec = LatentCodec(m.vae, device, m.latent_scale)
        for name, declared, actual in (("latent_channels", m.latent_channels, codec.spec.channels),
                                       ("latent_factor", m.latent_factor, codec.spec.factor)):
            if declared and declared != actual:
                raise ConfigError(f"config key 'model.{name}' ({declared}) differs from the VAE at {m.vae} ({actual})")
        _CODECS[key] = codec
    return _CODECS[key]


def diffusion_spec(cfg: Config, train: bool) -> ImageSpec:
    spec = image_spec(cfg, train)
    return spec if cfg.model.num_classes else dataclasses.replace(spec, num_classes=ANY_LABEL)


def check_stored_latents(cfg: Config, split: SplitInfo) -> None:
    """A set written by ``bigtrain encode-latents`` records the VAE, scale and image size it was
    encoded with: training on it with another VAE (or none) would denoise latents the run's VAE
    cannot decode, silently. Refused, naming both."""
    stored = split.meta.get("latents")  # the index entry's (data.dir's split, or beside a shard spec's shards)
    if not stored:
        return
    m = cfg.model
    if not m.vae:
        raise ConfigError(f"data.dir={split.root} holds latents encoded by {stored.get('vae')}: set model.vae to it")
    from bigtrain.diffusion.latent import latent_spec

    scale = latent_spec(m.vae, m.latent_scale).scale
    for what, saved, value in (("image size", stored.get("image_size"), cfg.data.image_size),
                               ("latent scale", stored.get("scale"), scale)):
        if saved != value:
            raise ConfigError(f"data.dir={split.root} holds latents encoded with {what} {saved!r}, this run has "
                              f"{value!r} (data.image_size, model.vae / model.latent_scale): encode the data again")
    if stored.get("vae") != os.path.abspath(m.vae):  # the same VAE may have moved: said, not refused
        log.warning("data.dir=%s was encoded by the VAE at %s; this run decodes with %s", split.root, stored.get("vae"),
                    os.path.abspath(m.vae))


def noised_train_data(cfg: Config, split: SplitInfo) -> NoisedImageDataset:
    from data_pipeline import NoisedImageDataset

    check_stored_latents(cfg, split)
    order = split.order(cfg.train.seed, cfg.data.shuffle_window)
    channels, side = denoised_shape(cfg.model)
    return NoisedImageDataset(split, order, diffusion_spec(cfg, train=True), cfg.train.seed, train=True,
                              noise_shape=(channels, side, side))


def diffusion_task(cfg: Config, model: nn.Module) -> DiffusionTask:
    from bigtrain.tasks.diffusion import DiffusionTask

    first = next(model.parameters(), None)
    codec = latent_codec(cfg, first.device if first is not None else "cpu")
    return DiffusionTask(model, cfg.diffusion, model.null_class, model.learn_sigma, codec.encode if codec else None)


def diffusion_evaluator(cfg: Config, train: SplitInfo, evals: SplitInfo, ctx: EvalContext) -> DiffusionEvaluator:
    from bigtrain.eval.diffusion import DiffusionEvaluator

    return DiffusionEvaluator(cfg, evals, diffusion_spec(cfg, train=False), ctx, latent_codec(cfg, ctx.device))


def diffusion_family_fields() -> dict[str, Any]:
    """The Family fields every image-denoising family shares (task, data, evaluator, debug run)."""
    from bigtrain.families.image_classification import write_digits_source

    return dict(
        tasks={"diffusion": diffusion_task}, train_data=noised_train_data, evaluator=diffusion_evaluator,
        data_sources={"digits": write_digits_source}, example_batch=diffusion_batch, pipeline=False,
        sample_unit=lambda m: ("images", 1),
        debug_overrides=("model.variant=debug", "model.image_size=16", "data.image_size=16", "data.augment=none",
                         "train.global_batch_size=32", "diffusion.sample_steps=5", "diffusion.samples=10",
                         "diffusion.eval_max_samples=128"),
    )


def check_diffusion_keys(cfg: Config) -> None:
    """The image keys agree with the data; the objective, sampler and variance fit together."""
    check_image_keys(cfg)
    d, m = cfg.diffusion, cfg.model
    if m.vae:
        from bigtrain.optional import require

        require("diffusers", "model.vae (a diffusers AutoencoderKL)")
    if getattr(m, "learn_sigma", False) and (d.objective != "ddpm" or d.prediction != "epsilon"):
        raise ConfigError(f"config key 'model.learn_sigma' needs diffusion.objective=ddpm and diffusion.prediction=epsilon "
                          f"(got {d.objective}, {d.prediction})")
    if d.sampler != "auto" and (d.sampler == "euler") != (d.objective == "flow"):
        raise ConfigError(f"config key 'diffusion.sampler' ({d.sampler}) does not sample diffusion.objective={d.objective} "
                          f"models (ddim/ddpm: ddpm, euler: flow)")
    if d.sample_steps > d.timesteps and d.objective == "ddpm":
        raise ConfigError(f"config key 'diffusion.sample_steps' ({d.sample_steps}) exceeds diffusion.timesteps ({d.timesteps})")
    if d.eval_classifier and not d.samples:
        raise ConfigError("config key 'diffusion.eval_classifier' scores samples: set diffusion.samples > 0 too")
    if m.vae:
        if any(v != 0.5 for v in (*cfg.data.mean, *cfg.data.std)):
            raise ConfigError("config key 'model.vae': the VAE reads images in [-1, 1]: set data.mean=[0.5] and "
                              "data.std=[0.5]")
        denoised_shape(m)


def diffusion_batch(model_cfg: Any, batch_size: int, generator: Any) -> dict[str, Any]:
    """A synthetic batch shaped like the noised-image loader's (benchmarks, the GPU check)."""
    import torch

    m = model_cfg
    shape = (batch_size, m.in_channels, m.image_size, m.image_size)
    channels, side = denoised_shape(m)
    return {"image": torch.rand(shape, generator=generator) * 2 - 1,
            "noise": torch.randn(batch_size, channels, side, side, generator=generator),
            "label": torch.randint(0, max(m.num_classes, 1), (batch_size,), generator=generator),
            "u": torch.rand(batch_size, generator=generator, dtype=torch.float64),
            "z": torch.randn(batch_size, generator=generator, dtype=torch.float64),
            "drop": torch.rand(batch_size, generator=generator, dtype=torch.float64), "weight": torch.ones(batch_size)}
