"""Top-1 accuracy on a held-out split plus few-shot linear probes on frozen features."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from bigtrain.config.schema import EvalConfig
from bigtrain.eval.fewshot import fewshot_accuracy
from data_pipeline import ImageSpec, SplitInfo, sequential_batches

log = logging.getLogger(__name__)


def warn_lost(split: SplitInfo, kept: int, lost: int) -> None:
    """Say loudly when the evaluation ran on fewer samples than the split holds."""
    if lost:
        log.warning("evaluation lost %d of %d samples of %s (unreadable; damaged shards: %s)", lost, kept + lost,
                    split.root, split.damaged_shards or "see the skipped-sample warnings")


class ClassificationEvaluator:
    best_metric = ("eval/top1", True)  # (metric that defines "best", higher is better)

    """``evaluator(model)`` -> ``{"eval/top1", "eval/loss", "eval/fewshot_{k}shot_top1", ...}``.

    The model's forward must accept ``with_features=True`` and return
    ``(logits, pre_logit_features)``, as the ViT does, so each image is encoded once.
    """

    def __init__(
        self,
        cfg: EvalConfig,
        train_split: SplitInfo,
        eval_split: SplitInfo,
        spec: ImageSpec,
        num_classes: int,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        num_workers: int = 0,
        dp_rank: int = 0,
        dp_size: int = 1,
        dp_group: Any = None,
        device: torch.device | None = None,
    ) -> None:
        self.cfg, self.train_split, self.eval_split = cfg, train_split, eval_split
        self.device = device or torch.device("cpu")
        self.spec, self.num_classes, self.autocast, self.num_workers = spec, num_classes, autocast, num_workers
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    @torch.no_grad()
    def _encode(self, model: nn.Module, split: SplitInfo, limit: int, logits: bool) -> dict[str, np.ndarray]:
        feats, labels, outs, lost = [], [], [], 0
        batches = sequential_batches(
            split, self.spec, self.cfg.batch_size, rank=self.dp_rank, world=self.dp_size, limit=limit,
            num_workers=self.num_workers, pin_memory=self.device.type == "cuda",
        )
        for batch in batches:
            keep = batch["weight"] > 0  # drop substitutes for bad samples
            lost += int(batch["num_errors"])
            with self.autocast():
                out, f = model(batch["image"].to(self.device, non_blocking=True), with_features=True)
            if logits:
                outs.append(out.float().cpu()[keep])
            feats.append(f.float().cpu()[keep])
            labels.append(batch["label"][keep])
        result = {"features": torch.cat(feats).numpy(), "labels": torch.cat(labels).numpy(), "lost": np.array([lost])}
        if logits:
            result["logits"] = torch.cat(outs).numpy()
        if self.dp_size > 1:  # every rank encoded its contiguous share; put them back in order
            gathered: list[Any] = [None] * self.dp_size
            dist.all_gather_object(gathered, result, group=self.dp_group)
            result = {k: np.concatenate([g[k] for g in gathered]) for k in result}
        return result

    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            test = self._encode(model, self.eval_split, 0, logits=True)
            labels, logits = torch.from_numpy(test["labels"]), torch.from_numpy(test["logits"])
            metrics = {
                "eval/top1": float((logits.argmax(-1) == labels).float().mean()),
                "eval/loss": float(F.cross_entropy(logits, labels)),
                "eval/num_samples": int(len(labels)),
                "eval/samples_lost": int(test["lost"].sum()),
            }
            warn_lost(self.eval_split, metrics["eval/num_samples"], metrics["eval/samples_lost"])
            if self.cfg.fewshot:
                train = self._encode(model, self.train_split, self.cfg.fewshot_max_train, logits=False)
                accs = fewshot_accuracy(
                    train["features"], train["labels"], test["features"], test["labels"],
                    self.num_classes, self.cfg.fewshot_shots, self.cfg.fewshot_seeds, self.cfg.fewshot_l2,
                )
                metrics.update({f"eval/fewshot_{k}shot_top1": v for k, v in accs.items()})
        finally:
            model.train(was_training)
        return metrics
