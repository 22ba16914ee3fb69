"""The ``model.*`` section of ``model.family: vit`` and its size presets."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from bigtrain.config.core import doc
from bigtrain.config.schema import ModelConfig
from bigtrain.models.args import VIT_SIZES


@dataclass
class ViTConfig(ModelConfig):
    variant: str = doc("Ti", "Size from 'Scaling Vision Transformers' (Ti,S,M,B,L,H,g,G), 'debug' (tiny) or 'custom'; "
                       "fills width/depth/mlp_dim/num_heads left at 0.")
    width: int = doc(0, "Hidden size; 0 = from variant.", ge=0)
    depth: int = doc(0, "Number of blocks; 0 = from variant.", ge=0)
    mlp_dim: int = doc(0, "MLP hidden size; 0 = from variant.", ge=0)
    num_heads: int = doc(0, "Attention heads; 0 = from variant.", ge=0)
    patch_size: int = doc(4, "Square patch size in pixels.", gt=0)
    image_size: int = doc(32, "Input resolution (must equal data.image_size).", gt=0)
    in_channels: int = doc(1, "Input channels (must equal data.channels).", gt=0)
    num_classes: int = doc(10, "Classifier outputs.", gt=0)
    head: Literal["cls", "gap", "map"] = doc("map", "Pooling: class token, global average pool, or multihead attention pooling.")
    posemb: Literal["learned", "sincos2d"] = doc("learned", "Position embedding type.")
    dropout: float = doc(0.0, "Dropout on attention output, MLP output and before the classifier.", ge=0, le=0.99)
    head_zero_init: bool = doc(True, "Zero-init the classifier (big_vision default).")
    head_bias_init: float = doc(
        0.0, "Initial classifier bias (big_vision's init_head_bias; -10 with task=sigmoid_classification, so the "
        "first steps do not push every class down from p = 0.5).")
    pretrained: str = doc(
        "", "A bigtrain checkpoint of a ViT to start from (e.g. a distillation teacher: teacher.pretrained): its "
        "sizes fill width/depth/mlp_dim/num_heads; the other keys must describe the same model. Each rank reads "
        "only its shards. '' = initialise from train.seed.")


PRESETS = {
    "debug": {"width": 32, "depth": 4, "mlp_dim": 64, "num_heads": 2},
    **{name: dict(zip(("width", "depth", "mlp_dim", "num_heads"), size)) for name, size in VIT_SIZES.items()},
}
