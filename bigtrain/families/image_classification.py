"""Building blocks for families that classify images (the ViT, a user's CNN or MLP, ...).

They read ``model.num_classes`` and the image keys of the ``data`` section, and give a family
its ``digits`` data source, training dataset and evaluator in one line each.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the functions import these on use: a family's __init__ imports this module light
    from bigtrain.config import Config
    from bigtrain.eval import ClassificationEvaluator
    from bigtrain.eval.context import EvalContext
    from data_pipeline import ImageBatchDataset, ImageSpec, SplitInfo


def image_spec(cfg: Config, train: bool) -> ImageSpec:
    from data_pipeline import ImageSpec

    d = cfg.data
    return ImageSpec(
        image_size=d.image_size, channels=d.channels, num_classes=cfg.model.num_classes, mean=list(d.mean),
        std=list(d.std), augment=d.augment if train else "none", crop_padding=d.crop_padding, on_error=d.on_error,
        max_member_bytes=d.max_member_bytes,
    )


def write_digits_source(cfg: Config, root: str) -> None:
    """``data.source: digits``: sklearn's 8x8 digits (embedded, no download), resized to data.image_size."""
    from data_pipeline.writer import write_digits

    write_digits(root, image_size=cfg.data.image_size, samples_per_shard=cfg.data.samples_per_shard, seed=0)


def image_train_data(cfg: Config, split: SplitInfo) -> ImageBatchDataset:
    from data_pipeline import ImageBatchDataset

    order = split.order(cfg.train.seed, cfg.data.shuffle_window)
    return ImageBatchDataset(split, order, image_spec(cfg, train=True), cfg.train.seed, train=True)


def classification_evaluator(cfg: Config, train: SplitInfo, evals: SplitInfo, ctx: EvalContext) -> ClassificationEvaluator:
    """Top-1 and loss on the eval split, and few-shot probes on the model's pre-logit features
    (the model's forward must accept ``with_features=True``; set ``eval.fewshot=false`` otherwise)."""
    from bigtrain.eval import ClassificationEvaluator

    return ClassificationEvaluator(
        cfg.eval, train, evals, image_spec(cfg, train=False), cfg.model.num_classes, autocast=ctx.autocast,
        num_workers=ctx.num_workers, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size, dp_group=ctx.dp_group, device=ctx.device,
    )


def check_image_keys(cfg: Config) -> None:
    """``model.image_size``/``model.in_channels`` agree with the data section; normalisation fits."""
    from bigtrain.config import ConfigError

    m, d = cfg.model, cfg.data
    if m.image_size != d.image_size:
        raise ConfigError(f"config key 'model.image_size' ({m.image_size}) must equal 'data.image_size' ({d.image_size})")
    if m.in_channels != d.channels:
        raise ConfigError(f"config key 'model.in_channels' ({m.in_channels}) must equal 'data.channels' ({d.channels})")
    for key in ("mean", "std"):
        vals = getattr(d, key)
        if len(vals) not in (1, d.channels):
            raise ConfigError(f"config key 'data.{key}' needs 1 or {d.channels} values, got {len(vals)}")


def image_batch(model_cfg: Any, batch_size: int, generator: Any) -> dict[str, Any]:
    """A synthetic batch shaped like the image loader's (benchmarks, the GPU check)."""
    import torch

    m = model_cfg
    return {"image": torch.randn(batch_size, m.in_channels, m.image_size, m.image_size, generator=generator),
            "label": torch.randint(0, m.num_classes, (batch_size,), generator=generator),
            "weight": torch.ones(batch_size)}
