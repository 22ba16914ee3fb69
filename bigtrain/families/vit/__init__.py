"""``model.family: vit`` — Vision Transformers of "Scaling Vision Transformers" (Ti ... G/14),
trained by image classification on webdataset shards, evaluated by top-1 and few-shot probes."""

from __future__ import annotations

from typing import Any

from torch import nn

from bigtrain.config import Config, ConfigError
from bigtrain.families import Family
from bigtrain.families.image_classification import (
    check_image_keys,
    classification_evaluator,
    image_batch,
    image_train_data,
    write_digits_source,
)
from bigtrain.families.vit.config import PRESETS, ViTConfig
from bigtrain.families.vit.parallelize import parallelize_vit
from bigtrain.models.vit import ViT, ViTArgs
from bigtrain.tasks import ClassificationTask


def vit_args(m: ViTConfig) -> ViTArgs:
    missing = [k for k in ("width", "depth", "mlp_dim", "num_heads") if not getattr(m, k)]
    if missing:
        raise ConfigError(f"model.variant={m.variant} needs {', '.join('model.' + k for k in missing)} set")
    args = ViTArgs(
        width=m.width, depth=m.depth, mlp_dim=m.mlp_dim, num_heads=m.num_heads, patch_size=m.patch_size,
        image_size=m.image_size, in_channels=m.in_channels, num_classes=m.num_classes, head=m.head, posemb=m.posemb,
        dropout=m.dropout, head_zero_init=m.head_zero_init, head_bias_init=m.head_bias_init,
    )
    try:
        args.check()
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None
    return args


def validate(cfg: Config) -> None:
    m = cfg.model
    check_image_keys(cfg)
    if m.image_size % m.patch_size:
        raise ConfigError(f"config key 'model.patch_size' ({m.patch_size}) must divide model.image_size ({m.image_size})")
    vit_args(m)


def flops_per_sample(model: nn.Module, m: Any) -> float:
    return float(model.train_flops_per_sample())


FAMILY = Family(
    name="vit",
    description="Vision Transformer ('Scaling Vision Transformers' sizes Ti..G, cls/gap/MAP heads), image classification",
    config=ViTConfig,
    build=lambda m: ViT(vit_args(m)),
    tasks={"classification": lambda cfg, model: ClassificationTask(model),
           "sigmoid_classification": lambda cfg, model: ClassificationTask(model, loss="sigmoid")},
    train_data=image_train_data,
    evaluator=classification_evaluator,
    flops_per_sample=flops_per_sample,
    data_sources={"digits": write_digits_source},
    presets=PRESETS,
    debug_overrides=("model.variant=debug", "train.global_batch_size=32", "eval.fewshot_shots=[1]",
                     "eval.fewshot_seeds=1"),
    parallelize=parallelize_vit,
    pipeline=True,
    validate=validate,
    example_batch=image_batch,
)
