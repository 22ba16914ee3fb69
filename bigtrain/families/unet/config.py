"""The ``model.*`` section of ``model.family: unet`` and its size presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.config.core import doc
from bigtrain.families.image_diffusion import ImageDiffusionConfig


@dataclass
class UNetConfig(ImageDiffusionConfig):
    variant: str = doc("debug", "Size preset: 'debug' (tiny), 'digits', 'sd15' (SD-1.x layout), 'sdxl' (the SDXL-base "
                       "UNet: 320/640/1280 channels, transformer depths 1/2/10, text_time conditioning) or 'custom'; "
                       "fills the size keys left at 0 / [].")
    channels: list[int] = doc([], "Channels per resolution level (block_out_channels); [] = from variant.", gt=0)
    attention: list[bool] = doc([], "Per level: cross-attention transformer blocks (true) or ResNet blocks only; "
                                "[] = from variant.")
    transformer_layers: list[int] = doc([], "Transformer depth per level (transformer_layers_per_block); [] = from "
                                        "variant.", gt=0)
    layers_per_block: int = doc(0, "ResNet (+ transformer) layers per down level; up levels have one more; 0 = from "
                                "variant.", ge=0)
    head_dim: int = doc(0, "Channels per attention head (diffusers' attention_head_dim = channels / this); 0 = from "
                        "variant.", ge=0)
    norm_groups: int = doc(0, "GroupNorm groups (must divide every level's channels); 0 = from variant.", ge=0)
    cross_attention_dim: int = doc(0, "Width of the text context the cross-attention reads; 0 = from variant.", ge=0)
    sdxl_conditioning: bool = doc(False, "SDXL's addition_embed_type=text_time: the pooled text embedding and the "
                                  "size/crop ids enter the time embedding (the sdxl preset sets it).")
    text_width: int = doc(0, "Hidden size of the CLIP text encoder (projected to cross_attention_dim when they "
                          "differ); 0 = from variant.", ge=0)
    text_layers: int = doc(0, "Layers of the CLIP text encoder; 0 = from variant.", ge=0)
    text_heads: int = doc(0, "Attention heads of the CLIP text encoder; 0 = from variant.", ge=0)
    skip_scaling: Literal["none", "constant", "exponential", "learnable"] = doc(
        "none", "ScaleLong scaling of the long skip connections: none, constant 1/sqrt(2), exponential "
        "skip_kappa^i (i = 0 for the outermost skip), or a learnable gate per skip.")
    skip_kappa: float = doc(0.5, "kappa of skip_scaling=exponential (ScaleLong suggests 0.5 to 0.95; 1 = plain).",
                            gt=0, le=1)


PRESETS = {
    "debug": {"channels": [16, 32], "attention": [False, True], "transformer_layers": [1, 1], "layers_per_block": 1,
              "head_dim": 8, "norm_groups": 8, "cross_attention_dim": 32, "text_width": 32, "text_layers": 1,
              "text_heads": 2},
    "digits": {"channels": [32, 64, 64], "attention": [False, True, True], "transformer_layers": [1, 1, 1],
               "layers_per_block": 1, "head_dim": 16, "norm_groups": 8, "cross_attention_dim": 64, "text_width": 64,
               "text_layers": 2, "text_heads": 4},
    "sd15": {"channels": [320, 640, 1280, 1280], "attention": [True, True, True, False], "transformer_layers": [1, 1, 1, 1],
             "layers_per_block": 2, "head_dim": 40, "norm_groups": 32, "cross_attention_dim": 768, "text_width": 768,
             "text_layers": 12, "text_heads": 12},
    "sdxl": {"channels": [320, 640, 1280], "attention": [False, True, True], "transformer_layers": [1, 2, 10],
             "layers_per_block": 2, "head_dim": 64, "norm_groups": 32, "cross_attention_dim": 2048, "text_width": 1280,
             "text_layers": 32, "text_heads": 20, "sdxl_conditioning": True},
}
