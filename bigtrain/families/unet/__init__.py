"""``model.family: unet`` — SD/SDXL-style text-conditioned UNets (``diffusers``'
``UNet2DConditionModel`` from a config, a CLIP text encoder from ``transformers``), with ScaleLong
scaling of the long skip connections, trained by denoising (``diffusion.*``) on image shards.
Needs ``pip install 'bigtrain[diffusers]'``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Family, lazy
from bigtrain.families.image_diffusion import check_diffusion_keys, denoised_shape, diffusion_family_fields
from bigtrain.families.unet.config import PRESETS, UNetConfig

if TYPE_CHECKING:  # torch and the model code load when a model is built, not when a config is read
    from torch import nn

    from bigtrain.config import Config

SIZE_KEYS = ("channels", "attention", "transformer_layers", "layers_per_block", "head_dim", "norm_groups",
             "cross_attention_dim", "text_width", "text_layers", "text_heads")


def unet_args(m: UNetConfig) -> Any:
    from bigtrain.models.args import UNetArgs

    missing = [k for k in SIZE_KEYS if getattr(m, k) in (0, [])]
    if missing:
        raise ConfigError(f"model.variant={m.variant} needs {', '.join('model.' + k for k in missing)} set")
    in_channels, side = denoised_shape(m)
    args = UNetArgs(channels=tuple(m.channels), attention=tuple(m.attention), transformer_layers=tuple(m.transformer_layers),
                    layers_per_block=m.layers_per_block, head_dim=m.head_dim, norm_groups=m.norm_groups,
                    cross_attention_dim=m.cross_attention_dim, sdxl_conditioning=m.sdxl_conditioning,
                    image_size=side, in_channels=in_channels, num_classes=m.num_classes,
                    text_width=m.text_width, text_layers=m.text_layers, text_heads=m.text_heads,
                    skip_scaling=m.skip_scaling, skip_kappa=m.skip_kappa)
    try:
        args.check()
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    if side % 2 ** (len(m.channels) - 1):
        raise ConfigError(f"config key 'model.image_size' ({m.image_size}{', latent ' + str(side) if m.vae else ''}) "
                          f"must be divisible by 2^(levels - 1) = {2 ** (len(m.channels) - 1)} (one downsampling per "
                          f"level but the last)")
    return args


def build(m: UNetConfig) -> nn.Module:
    from bigtrain.models.unet import ConditionedUNet

    return ConditionedUNet(unet_args(m))


def validate(cfg: Config) -> None:
    from bigtrain.optional import require

    require("diffusers", "model.family=unet (diffusers' UNet2DConditionModel)")
    require("transformers", "model.family=unet (its CLIP text encoder)")
    check_diffusion_keys(cfg)
    unet_args(cfg.model)


def flops_per_sample(model: nn.Module, m: Any) -> float:
    return float(model.train_flops_per_sample())


FAMILY = Family(
    name="unet",
    description="SD/SDXL-style UNet (diffusers UNet2DConditionModel + CLIP text encoder), ScaleLong skip scaling",
    **diffusion_family_fields(),
    config=UNetConfig,
    build=build,
    flops_per_sample=flops_per_sample,
    presets=PRESETS,
    validate=validate,
    parallelize=lazy("bigtrain.families.unet.parallelize:parallelize_unet"),
    check_layout=lazy("bigtrain.families.unet.parallelize:check_layout"),
)
