"""Evaluation of diffusion models: the denoising loss on held-out images, a grid of samples, and
(with a classifier of the data) how good the samples are.

* ``eval/loss``, ``eval/mse``: the training objective on the first ``diffusion.eval_max_samples``
  eval images, each with fixed noise and timestep (drawn from seed 0 and its position), labels
  never dropped: comparable across evaluations, runs and layouts.
* ``diffusion.samples`` > 0: that many samples (one row per class), generated with the configured
  sampler, steps and guidance from fixed noise (seed 0: the same starting noise at every
  evaluation, so the grids show training progress), split over the data-parallel ranks; written
  to ``RUN/samples/step_XXXXXXXX.png``.
* with ``diffusion.eval_classifier``: ``eval/sample_top1`` (the classifier's agreement with the
  requested classes) and ``eval/sample_fd`` (Frechet distance to the eval images in its feature
  space), see :mod:`bigtrain.diffusion.quality`.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from bigtrain.config import Config
from bigtrain.diffusion.quality import SampleScorer, class_labels, save_grid, to_pixels
from bigtrain.diffusion.sampling import generate
from bigtrain.eval.classification import warn_lost
from bigtrain.eval.context import EvalContext
from bigtrain.tasks.diffusion import DiffusionTask
from bigtrain.tasks.protocol import batch_to_device
from data_pipeline import ImageSpec, NoisedImageDataset, SplitInfo, sequential_batches

log = logging.getLogger(__name__)


class DiffusionEvaluator:
    """``evaluator(model)`` for models called ``model(x, t, y)`` that expose ``null_class`` (None:
    unconditional), ``learn_sigma`` and ``sample_shape`` (C, H, W of what they denoise); ``codec``:
    the VAE between images and latents of a latent model."""

    def __init__(self, cfg: Config, eval_split: SplitInfo, spec: ImageSpec, ctx: EvalContext, codec: Any = None) -> None:
        self.cfg, self.d, self.split, self.spec, self.ctx = cfg, cfg.diffusion, eval_split, spec, ctx
        self.codec = codec  # a LatentCodec for latent models
        scored = bool(self.d.eval_classifier and self.d.samples)
        self.best_metric = ("eval/sample_fd", False) if scored else ("eval/loss", False)
        # loaded now, before training: a missing or wrong classifier is found at start-up, not at the end
        self.scorer: SampleScorer | None = SampleScorer(self.d.eval_classifier, spec.image_size, spec.channels,
                                                        ctx.device) if self.d.eval_classifier else None
        self.reference: np.ndarray | None = None  # the classifier's features of the eval images

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """Model-space images (the data's normalisation) as pixel values in [0, 1]."""
        return to_pixels(x, self.spec.mean, self.spec.std)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        try:
            metrics, images = self._loss(model)
            if self.d.samples:
                metrics.update(self._samples(model, images))
        finally:
            model.train(was_training)
        return metrics

    def _loss(self, model: nn.Module) -> tuple[dict[str, float], torch.Tensor]:
        ctx = self.ctx
        task = DiffusionTask(model, self.d, model.null_class, model.learn_sigma,
                             self.codec.encode if self.codec else None, drop_labels=False).to(ctx.device)
        totals = torch.zeros(5, dtype=torch.float64)  # loss * n, mse * n, n, samples, lost
        images = []
        batches = sequential_batches(
            self.split, None, self.cfg.eval.batch_size, ctx.dp_rank, ctx.dp_size, self.d.eval_max_samples,
            num_workers=ctx.num_workers, pin_memory=ctx.device.type == "cuda",
            make_dataset=lambda split, order: NoisedImageDataset(split, order, self.spec, 0, train=False,
                                                                 noise_shape=tuple(model.sample_shape)))
        shown = min(self.split.num_samples, self.d.eval_max_samples)  # this rank's share of them, in batches
        share = (ctx.dp_rank + 1) * shown // ctx.dp_size - ctx.dp_rank * shown // ctx.dp_size
        progress = ctx.progress(math.ceil(share / self.cfg.eval.batch_size), "denoising loss", "batch")
        for batch in batches:
            progress.update()
            if self.d.eval_classifier and self.d.samples:  # the real images the samples are compared with
                keep = batch["weight"] > 0
                images.append(batch["image"][keep] if "image" in batch else  # stored latents: decoded
                              self.codec.decode(batch["latent"][keep].to(ctx.device)).cpu())
            batch = batch_to_device(batch, ctx.device)
            with ctx.autocast():
                out = task(batch)
            n = float(batch["weight"].sum())
            totals += torch.tensor([float(out["loss"]) * n, float(out["mse"]) * n, n, batch["num_samples"],
                                    batch["num_errors"]], dtype=torch.float64)
        progress.close()
        if ctx.dp_size > 1:
            totals = totals.to(ctx.device)
            dist.all_reduce(totals, group=ctx.dp_group)
            totals = totals.cpu()
        warn_lost(self.split, int(totals[3]), int(totals[4]))
        n = float(totals[2].clamp_min(1))
        metrics = {"eval/loss": float(totals[0]) / n, "eval/mse": float(totals[1]) / n,
                   "eval/num_samples": int(totals[3]), "eval/samples_lost": int(totals[4])}
        return metrics, torch.cat(images) if images else torch.empty(0)

    def _samples(self, model: nn.Module, images: torch.Tensor) -> dict[str, float]:
        ctx, d = self.ctx, self.d
        null = model.null_class
        labels, rows = class_labels(d.samples, null)
        n = len(labels)
        per = math.ceil(n / ctx.dp_size)  # every rank runs the same number of forwards (FSDP, TP)
        mine = [min(i, n - 1) for i in range(ctx.dp_rank * per, (ctx.dp_rank + 1) * per)]
        progress = ctx.progress(d.sample_steps, f"{n} samples", "step")
        with ctx.autocast():
            out = generate(model, labels[mine], mine, model.sample_shape, objective=d.objective,
                           prediction=d.prediction, schedule=d.schedule, timesteps=d.timesteps, sampler=d.sampler,
                           steps=d.sample_steps, guidance=d.guidance, null=null, seed=0,
                           clip=self.codec is None, device=ctx.device, on_step=progress.update).float()
            if self.codec is not None:
                out = self.codec.decode(out)
        progress.close()
        if ctx.dp_size > 1:
            parts = [torch.empty_like(out) for _ in range(ctx.dp_size)]
            dist.all_gather(parts, out.contiguous(), group=ctx.dp_group)
            out = torch.cat(parts)
        pixels = self.to_pixels(out[:n])
        metrics: dict[str, float] = {}
        if self.ctx.run_dir and (not dist.is_initialized() or dist.get_rank() == 0):
            path = save_grid(pixels, rows, os.path.join(self.ctx.run_dir, "samples", f"step_{self.ctx.step():08d}.png"))
            log.info("samples: %s", path)
        if d.eval_classifier:
            metrics.update(self._score(pixels, labels if null is not None else None, images))
        return metrics

    def _score(self, pixels: torch.Tensor, labels: torch.Tensor | None, images: torch.Tensor) -> dict[str, Any]:
        if self.scorer is None:
            self.scorer = SampleScorer(self.d.eval_classifier, self.spec.image_size, self.spec.channels, self.ctx.device)
        if self.reference is None:
            mine = self.scorer.features(self.to_pixels(images))[1] if len(images) else np.zeros((0, 0), np.float32)
            if self.ctx.dp_size > 1:
                gathered: list[Any] = [None] * self.ctx.dp_size
                dist.all_gather_object(gathered, mine, group=self.ctx.dp_group)
                mine = np.concatenate([g for g in gathered if len(g)])
            self.reference = mine
        return {f"eval/sample_{k}": v for k, v in self.scorer.score(pixels, labels, self.reference).items()}
