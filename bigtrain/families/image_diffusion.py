"""Building blocks for families that denoise images (DiT, UNet, a user's own): the training
data with per-sample noise, the denoising task, the evaluator with sample grids, a synthetic batch
and the cross-section checks. A model plugs in by being called ``model(x, t, y)`` and exposing
``null_class``, ``learn_sigma`` and ``sample_shape`` (see :class:`bigtrain.eval.diffusion.DiffusionEvaluator`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from bigtrain.config import Config, ConfigError
from bigtrain.eval.diffusion import DiffusionEvaluator
from bigtrain.families import EvalContext
from bigtrain.families.image_classification import check_image_keys, image_spec
from bigtrain.tasks.diffusion import DiffusionTask
from data_pipeline import GlobalOrder, ImageSpec, NoisedImageDataset, SplitInfo

ANY_LABEL = 2**31 - 1  # unconditional models read whatever labels the data has, and ignore them


def diffusion_spec(cfg: Config, train: bool) -> ImageSpec:
    spec = image_spec(cfg, train)
    return spec if cfg.model.num_classes else dataclasses.replace(spec, num_classes=ANY_LABEL)


def noised_train_data(cfg: Config, split: SplitInfo) -> NoisedImageDataset:
    order = GlobalOrder([sh.num_samples for sh in split.shards], cfg.train.seed, cfg.data.shuffle_window)
    return NoisedImageDataset(split, order, diffusion_spec(cfg, train=True), cfg.train.seed, train=True)


def diffusion_task(cfg: Config, model: nn.Module) -> DiffusionTask:
    return DiffusionTask(model, cfg.diffusion, model.null_class, model.learn_sigma, getattr(model, "encode", None))


def diffusion_evaluator(cfg: Config, train: SplitInfo, evals: SplitInfo, ctx: EvalContext) -> DiffusionEvaluator:
    return DiffusionEvaluator(cfg, evals, diffusion_spec(cfg, train=False), ctx)


def check_diffusion_keys(cfg: Config) -> None:
    """The image keys agree with the data; the objective, sampler and variance fit together."""
    check_image_keys(cfg)
    d, m = cfg.diffusion, cfg.model
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


def diffusion_batch(model_cfg: Any, batch_size: int, generator: Any) -> dict[str, Any]:
    """A synthetic batch shaped like the noised-image loader's (benchmarks, the GPU check)."""
    import torch

    m = model_cfg
    shape = (batch_size, m.in_channels, m.image_size, m.image_size)
    return {"image": torch.rand(shape, generator=generator) * 2 - 1, "noise": torch.randn(shape, generator=generator),
            "label": torch.randint(0, max(m.num_classes, 1), (batch_size,), generator=generator),
            "u": torch.rand(batch_size, generator=generator, dtype=torch.float64),
            "z": torch.randn(batch_size, generator=generator, dtype=torch.float64),
            "drop": torch.rand(batch_size, generator=generator, dtype=torch.float64), "weight": torch.ones(batch_size)}
