"""``model.family: vit`` — Vision Transformers of "Scaling Vision Transformers" (Ti ... G/14),
trained by image classification on webdataset shards, evaluated by top-1 and few-shot probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bigtrain.config.core import ConfigError
from bigtrain.config.registry import Family, Pretrained, lazy
from bigtrain.families.image_classification import (
    check_image_keys,
    classification_evaluator,
    image_batch,
    image_train_data,
    write_digits_source,
)
from bigtrain.families.vit.config import PRESETS, ViTConfig
from bigtrain.models.args import ViTArgs

if TYPE_CHECKING:  # torch and the model code load when a model is built, not when a config is read
    from torch import nn

    from bigtrain.config import Config
    from bigtrain.tasks import ClassificationTask
    from bigtrain.tasks.distill import DistillClassificationTask


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
    t = cfg.teacher
    if t.family == "vit":
        if not t.pretrained:
            raise ConfigError("config key 'teacher.pretrained' must name the teacher's weights (a bigtrain checkpoint "
                              "of a ViT): a randomly initialised teacher teaches nothing")
        for key in ("image_size", "in_channels", "num_classes"):  # the teacher reads the student's batches
            if getattr(t, key) != getattr(m, key):
                raise ConfigError(f"config key 'teacher.{key}' ({getattr(t, key)}) differs from model.{key} "
                                  f"({getattr(m, key)}): the teacher must read the student's images and classes")


def pretrained(m: ViTConfig) -> Pretrained | None:
    """``model.pretrained`` / ``teacher.pretrained``: a bigtrain checkpoint of a ViT."""
    if not m.pretrained:
        return None
    from bigtrain.checkpoint.sources import checkpoint_source

    return checkpoint_source(m.pretrained, "vit", ("width", "depth", "mlp_dim", "num_heads"),
                             finish=lambda model: model.reset_buffers(next(model.parameters()).device))


def build(m: ViTConfig) -> nn.Module:
    from bigtrain.models.vit import ViT

    return ViT(vit_args(m))


def classification_task(cfg: Config, model: nn.Module, loss: str = "softmax") -> ClassificationTask:
    from bigtrain.tasks import ClassificationTask

    return ClassificationTask(model, loss=loss)


def distill_task(cfg: Config, model: nn.Module, teacher: nn.Module | None) -> DistillClassificationTask:
    from bigtrain.tasks.distill import DistillClassificationTask

    d = cfg.distill
    return DistillClassificationTask(model, teacher, d.temperature, d.kd_weight, d.ce_weight)


distill_task.uses_teacher = True  # type: ignore[attr-defined]


def flops_per_sample(model: nn.Module, m: Any) -> float:
    return float(model.train_flops_per_sample())


FAMILY = Family(
    name="vit",
    description="Vision Transformer ('Scaling Vision Transformers' sizes Ti..G, cls/gap/MAP heads), image classification",
    config=ViTConfig,
    build=build,
    tasks={"classification": classification_task,
           "sigmoid_classification": lambda cfg, model: classification_task(cfg, model, loss="sigmoid"),
           "distill": distill_task},
    train_data=image_train_data,
    evaluator=classification_evaluator,
    flops_per_sample=flops_per_sample,
    data_sources={"digits": write_digits_source},
    presets=PRESETS,
    debug_overrides=("model.variant=debug", "train.global_batch_size=32", "eval.fewshot_shots=[1]",
                     "eval.fewshot_seeds=1"),
    parallelize=lazy("bigtrain.families.vit.parallelize:parallelize_vit"),
    check_layout=lazy("bigtrain.families.vit.parallelize:check_layout"),
    pipeline=True,
    validate=validate,
    example_batch=image_batch,
    pretrained=pretrained,
)
