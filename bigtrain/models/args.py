"""The models' arguments as plain data: sizes, presets and their checks import no torch, so a
config is resolved and validated (``bigtrain config show``) without loading torch; the modules
beside this one build the networks from them (and re-export them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

# name: (width, depth, mlp_dim, heads)
VIT_SIZES: dict[str, tuple[int, int, int, int]] = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "G": (1664, 48, 8192, 16),
}


@dataclass(frozen=True)
class ViTArgs:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int
    patch_size: int = 16
    image_size: int = 224
    in_channels: int = 3
    num_classes: int = 1000
    head: str = "map"  # cls | gap | map
    posemb: str = "learned"  # learned | sincos2d
    dropout: float = 0.0
    head_zero_init: bool = True
    head_bias_init: float = 0.0  # big_vision's init_head_bias: -10 with a sigmoid loss

    @classmethod
    def from_variant(cls, variant: str, **overrides: object) -> ViTArgs:
        """``from_variant("G", patch_size=14)``; zero/None overrides keep the table value."""
        if variant == "custom":
            base = {}
        elif variant in VIT_SIZES:
            w, d, m, h = VIT_SIZES[variant]
            base = {"width": w, "depth": d, "mlp_dim": m, "num_heads": h}
        else:
            raise ValueError(f"unknown ViT variant {variant!r}; choose from {sorted(VIT_SIZES)} or 'custom'")
        base.update({k: v for k, v in overrides.items() if v not in (None, 0) or k in ("dropout",)})
        missing = [k for k in ("width", "depth", "mlp_dim", "num_heads") if not base.get(k)]
        if missing:
            raise ValueError(f"ViT variant 'custom' needs {missing} set")
        args = cls(**base)  # type: ignore[arg-type]
        args.check()
        return args

    def check(self) -> None:
        if self.width % self.num_heads:
            raise ValueError(f"ViT width {self.width} is not divisible by num_heads {self.num_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.head not in ("cls", "gap", "map"):
            raise ValueError(f"unknown ViT head {self.head!r}")
        if self.posemb not in ("learned", "sincos2d"):
            raise ValueError(f"unknown ViT posemb {self.posemb!r}")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def seq_len(self) -> int:
        return self.num_patches + (1 if self.head == "cls" else 0)


# name -> (depth, width, heads); each with patch 2, 4 or 8 ("XL/2")
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}


@dataclass
class DiTArgs:
    depth: int
    width: int
    num_heads: int
    patch_size: int = 2
    input_size: int = 32  # latent (or pixel) side length
    in_channels: int = 4
    num_classes: int = 1000
    learn_sigma: bool = True
    mlp_ratio: float = 4.0
    freq_dim: int = 256  # sinusoidal timestep features

    @property
    def out_channels(self) -> int:
        return self.in_channels * (2 if self.learn_sigma else 1)

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2

    def check(self) -> None:
        if self.input_size % self.patch_size:
            raise ValueError(f"patch size {self.patch_size} does not divide the input size {self.input_size}")
        if self.width % self.num_heads:
            raise ValueError(f"width {self.width} is not divisible by {self.num_heads} heads")
        if self.width % 4:
            raise ValueError(f"the 2-D sin-cos position embedding needs the width divisible by 4, got {self.width}")


def dit_args(name: str, **overrides: object) -> DiTArgs:
    """``"XL/2"`` -> the paper's sizes with that patch size (plus any field overrides)."""
    size, _, patch = name.partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"unknown DiT preset {name!r}; choose from {[f'{s}/{p}' for s in DIT_SIZES for p in (2, 4, 8)]}")
    depth, width, heads = DIT_SIZES[size]
    return DiTArgs(depth=depth, width=width, num_heads=heads, patch_size=int(patch), **overrides)  # type: ignore[arg-type]


SKIP_SCALINGS = ("none", "constant", "exponential", "learnable")


@dataclass
class UNetArgs:
    channels: Sequence[int] = (32, 64)  # block_out_channels, one per resolution level
    attention: Sequence[bool] = (False, True)  # levels with cross-attention transformer blocks
    transformer_layers: Sequence[int] = (1, 1)  # transformer depth per level (transformer_layers_per_block)
    layers_per_block: int = 1
    head_dim: int = 8  # channels per attention head (diffusers' attention_head_dim is a head *count*)
    norm_groups: int = 8
    cross_attention_dim: int = 32
    use_linear_projection: bool = True
    sdxl_conditioning: bool = False  # addition_embed_type="text_time": pooled text + size/crop ids
    addition_time_embed_dim: int = 256
    image_size: int = 16
    in_channels: int = 1
    num_classes: int = 10
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    text_tokens: int = 4  # caption length: bos, class word, eos, padding
    skip_scaling: str = "none"
    skip_kappa: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)  # further UNet2DConditionModel keys

    def check(self) -> None:
        n = len(self.channels)
        if not (len(self.attention) == len(self.transformer_layers) == n) or n < 1:
            raise ValueError(f"channels, attention and transformer_layers need one entry per level ({n})")
        for c in self.channels:
            if c % self.norm_groups:
                raise ValueError(f"channels {list(self.channels)} must be divisible by norm_groups {self.norm_groups}")
            if c % self.head_dim:
                raise ValueError(f"channels {list(self.channels)} must be divisible by head_dim {self.head_dim}")
        if self.skip_scaling not in SKIP_SCALINGS:
            raise ValueError(f"skip scaling {self.skip_scaling!r} is not one of {SKIP_SCALINGS}")
        if not 0 < self.skip_kappa <= 1:
            raise ValueError(f"skip kappa must be in (0, 1], got {self.skip_kappa}")
        if self.text_tokens < 3 or self.text_width % self.text_heads:
            raise ValueError("text_tokens must be >= 3 and text_width divisible by text_heads")

    def unet_config(self) -> dict[str, Any]:
        levels = range(len(self.channels))
        down = ["CrossAttnDownBlock2D" if self.attention[i] else "DownBlock2D" for i in levels]
        up = ["CrossAttnUpBlock2D" if self.attention[i] else "UpBlock2D" for i in reversed(levels)]
        config: dict[str, Any] = dict(
            sample_size=self.image_size, in_channels=self.in_channels, out_channels=self.in_channels,
            block_out_channels=tuple(self.channels), down_block_types=tuple(down), up_block_types=tuple(up),
            layers_per_block=self.layers_per_block, norm_num_groups=self.norm_groups,
            cross_attention_dim=self.cross_attention_dim, transformer_layers_per_block=tuple(self.transformer_layers),
            attention_head_dim=tuple(c // self.head_dim for c in self.channels),
            use_linear_projection=self.use_linear_projection,
            mid_block_type="UNetMidBlock2DCrossAttn" if any(self.attention) else None,
        )
        if self.sdxl_conditioning:
            config.update(addition_embed_type="text_time", addition_time_embed_dim=self.addition_time_embed_dim,
                          projection_class_embeddings_input_dim=6 * self.addition_time_embed_dim + self.text_width)
        config.update(self.extra)
        return config


# the Hugging Face causal-LM classes bigtrain.models.causal_lm re-houses (same layer layout)
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
