"""The ``model.*`` section of ``model.family: dit`` and its size presets."""

from __future__ import annotations

from dataclasses import dataclass

from bigtrain.config.core import doc
from bigtrain.families.image_diffusion import ImageDiffusionConfig
from bigtrain.models.args import DIT_SIZES as SIZES


@dataclass
class DiTConfig(ImageDiffusionConfig):
    variant: str = doc("debug", "Size from the DiT paper, 'S/2' ... 'XL/8' (size / patch), 'debug' (tiny) or 'custom'; "
                       "fills depth/width/num_heads/patch_size left at 0.")
    depth: int = doc(0, "Number of adaLN-Zero blocks; 0 = from variant.", ge=0)
    width: int = doc(0, "Hidden size; 0 = from variant.", ge=0)
    num_heads: int = doc(0, "Attention heads; 0 = from variant.", ge=0)
    patch_size: int = doc(0, "Square patch size; 0 = from variant.", ge=0)
    learn_sigma: bool = doc(False, "Also predict the variance interpolation (twice the output channels, DiT's hybrid "
                            "loss with the variational bound; needs diffusion.objective=ddpm, prediction=epsilon).")
    mlp_ratio: float = doc(4.0, "MLP hidden size / width.", gt=0)


PRESETS = {
    "debug": {"depth": 2, "width": 64, "num_heads": 4, "patch_size": 4},
    **{f"{name}/{p}": {"depth": d, "width": w, "num_heads": h, "patch_size": p}
       for name, (d, w, h) in SIZES.items() for p in (2, 4, 8)},
}
