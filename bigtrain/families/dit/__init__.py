"""``model.family: dit`` — Diffusion Transformers ("Scalable Diffusion Models with Transformers":
S/B/L/XL with patch 2/4/8, adaLN-Zero, class labels with a null class for classifier-free
guidance, optional learned variance), trained by denoising (``diffusion.*``) on image shards and
evaluated by held-out denoising loss, sample grids and a classifier's score of the samples."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Family, lazy
from bigtrain.families.dit.config import PRESETS, DiTConfig
from bigtrain.families.image_diffusion import check_diffusion_keys, denoised_shape, diffusion_family_fields
from bigtrain.models.args import DiTArgs

if TYPE_CHECKING:  # torch and the model code load when a model is built, not when a config is read
    from torch import nn

    from bigtrain.config import Config


def dit_args(m: DiTConfig) -> DiTArgs:
    missing = [k for k in ("depth", "width", "num_heads", "patch_size") if not getattr(m, k)]
    if missing:
        raise ConfigError(f"model.variant={m.variant} needs {', '.join('model.' + k for k in missing)} set")
    channels, side = denoised_shape(m)
    args = DiTArgs(depth=m.depth, width=m.width, num_heads=m.num_heads, patch_size=m.patch_size,
                   input_size=side, in_channels=channels, num_classes=m.num_classes,
                   learn_sigma=m.learn_sigma, mlp_ratio=m.mlp_ratio)
    try:
        args.check()
    except ValueError as exc:
        raise ConfigError(f"model: {exc} (model.patch_size / model.image_size / model.width / model.num_heads)") from None
    return args


def build(m: DiTConfig) -> nn.Module:
    from bigtrain.models.dit import DiT

    return DiT(dit_args(m))


def validate(cfg: Config) -> None:
    check_diffusion_keys(cfg)
    dit_args(cfg.model)


def flops_per_sample(model: nn.Module, m: Any) -> float:
    return float(model.train_flops_per_sample())


FAMILY = Family(
    name="dit",
    description="Diffusion Transformer (DiT S..XL / 2,4,8; adaLN-Zero, classifier-free guidance), denoising images",
    **diffusion_family_fields(),
    config=DiTConfig,
    build=build,
    flops_per_sample=flops_per_sample,
    presets=PRESETS,
    validate=validate,
    parallelize=lazy("bigtrain.families.dit.parallelize:parallelize_dit"),
    check_layout=lazy("bigtrain.families.dit.parallelize:check_layout"),
)
