"""Looking at samples: image grids, and a sample-quality score computable on a CPU.

The score uses a trained image classifier of the same data (a bigtrain checkpoint of a model whose
forward takes ``with_features=True``, e.g. the digits ViT): the top-1 of its predictions against the
classes the samples were asked for (do class-conditional samples show their class?) and the
Frechet distance between the Gaussians fitted to its pre-logit features of the samples and of real
eval images (FID's formula in that classifier's feature space: lower is closer to the data).
"""

from __future__ import annotations

import math
import inspect
import os
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from PIL import Image


def grid_image(images: torch.Tensor, rows: int, min_tile: int = 48) -> Image.Image:
    """(N, C, H, W) images in [0, 1] as one picture, ``rows`` rows filled left to right, each tile
    upscaled (nearest) to at least ``min_tile`` pixels so small images stay visible."""
    from PIL import Image  # noqa: F811 - the annotation's name, imported where it is used

    n, c, h, w = images.shape
    cols = max(1, math.ceil(n / rows))
    scale = max(1, math.ceil(min_tile / max(h, w)))
    pixels = (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    pixels = pixels.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    th, tw, pad = h * scale, w * scale, 2
    sheet = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        tile = pixels[i].permute(1, 2, 0).numpy()
        tile = np.repeat(tile, 3, axis=2) if c == 1 else tile[..., :3]
        y, x = pad + r * (th + pad), pad + k * (tw + pad)
        sheet[y:y + th, x:x + tw] = tile
    return Image.fromarray(sheet)


def save_grid(images: torch.Tensor, rows: int, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.png"
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", "bigtrain sample")  # marks the file as ours: a rerun may replace it
    grid_image(images, rows).save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)  # a reader (the report) never sees half a picture
    return path


def class_labels(n: int, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """Labels of an ``n``-sample grid and its row count: one row per class (n rounded down to a
    multiple of the classes, at least one column), or a square-ish grid for unconditional models."""
    if not num_classes:
        return torch.zeros(n, dtype=torch.long), max(1, round(math.sqrt(n)))
    cols = max(1, n // num_classes)
    return torch.arange(num_classes).repeat_interleave(cols), num_classes


def to_pixels(x: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """Images in a data set's normalisation ((pixel - mean) / std, one value or one per channel)
    as pixel values in [0, 1], on the CPU."""
    c = x.shape[1]
    m = torch.tensor(mean * (c if len(mean) == 1 else 1)).view(1, -1, 1, 1)
    s = torch.tensor(std * (c if len(std) == 1 else 1)).view(1, -1, 1, 1)
    return (x.float().cpu() * s + m).clamp(0, 1)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) of two feature sets (rows = samples)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    # tr sqrt(S_a S_b) = tr sqrt(S_a^1/2 S_b S_a^1/2), a symmetric PSD matrix
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ s_b @ root_a), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * cross)


class SampleScorer:
    """A classifier checkpoint, loaded whole into this process, that scores samples."""

    def __init__(self, checkpoint: str, image_size: int, channels: int, device: torch.device) -> None:
        from bigtrain.checkpoint.sources import model_from_checkpoint
        from bigtrain.config import ConfigError

        def classifier(cfg: Any, model: nn.Module) -> None:
            if (cfg.data.image_size, cfg.data.channels) != (image_size, channels):
                raise ConfigError(f"config key 'diffusion.eval_classifier': {checkpoint} classifies {cfg.data.channels}x"
                                  f"{cfg.data.image_size}px images, the samples are {channels}x{image_size}px")
            if "with_features" not in inspect.signature(model.forward).parameters:
                raise ConfigError(f"config key 'diffusion.eval_classifier' / --classifier: {checkpoint} holds a "
                                  f"model.family={cfg.model.family} model, not an image classifier with features")

        cfg, model, _ = model_from_checkpoint(checkpoint, "diffusion.eval_classifier", "auto", accept=classifier)
        self.model: nn.Module = model.to(device).eval()
        self.device, self.num_classes = device, int(getattr(cfg.model, "num_classes", 0))
        self.mean = torch.tensor(cfg.data.mean).view(1, -1, 1, 1)
        self.std = torch.tensor(cfg.data.std).view(1, -1, 1, 1)

    @torch.no_grad()
    def features(self, pixels: torch.Tensor, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """(logits, pre-logit features) of images with pixel values in [0, 1]."""
        logits, feats = [], []
        for chunk in pixels.split(batch):
            x = (chunk.float().cpu() - self.mean) / self.std
            out, f = self.model(x.to(self.device), with_features=True)
            logits.append(out.float().cpu())
            feats.append(f.float().cpu())
        return torch.cat(logits).numpy(), torch.cat(feats).numpy()

    def score(self, pixels: torch.Tensor, labels: torch.Tensor | None, reference: np.ndarray) -> dict[str, float]:
        """``fd``: Frechet distance of the samples' features to ``reference`` (real images' features);
        ``top1`` (class-conditional samples, ``labels`` given): agreement with the requested classes."""
        logits, feats = self.features(pixels)
        result = {"fd": frechet_distance(feats, reference)}
        if labels is not None:
            result["top1"] = float((torch.from_numpy(logits).argmax(-1) == labels).float().mean())
        return result
