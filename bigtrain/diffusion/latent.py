"""Latent diffusion: a frozen ``diffusers`` VAE (``AutoencoderKL``) from a local directory
(``model.vae: DIR``, a ``save_pretrained`` folder with ``config.json``; nothing is downloaded)
between the data's images and the space the model denoises.

encode(x) = (mean of the VAE posterior - shift) * scale (the latent std normaliser: SD's 0.18215,
from the VAE's config unless ``model.latent_scale`` overrides it); decode(z) = VAE.decode(z / scale +
shift). The posterior mean, not a draw: the encoding of a sample is then the same on every rank
and resume (SD's VAE posterior std is tiny next to the diffusion noise). Images must be in
[-1, 1] (data.mean = data.std = 0.5), the range the VAE was trained on. The VAE is replicated on
every rank, never trained and never in a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigtrain.config.core import ConfigError

if TYPE_CHECKING:  # latent_spec validates a config without torch; the codec imports it
    import torch


@dataclass(frozen=True)
class LatentSpec:
    channels: int
    factor: int  # image side / latent side
    scale: float
    shift: float


def latent_spec(path: str, scale: float = 0.0, key: str = "model.vae") -> LatentSpec:
    """The latent layout of a VAE directory, from its config.json alone (no weights read)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"config key '{key}': {path} is not a diffusers VAE directory (no config.json)")
    with open(config) as f:
        c = json.load(f)
    if c.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise ConfigError(f"config key '{key}': {path} holds a {c.get('_class_name')}, not an AutoencoderKL")
    return LatentSpec(channels=int(c.get("latent_channels", 4)), factor=2 ** (len(c.get("block_out_channels", [64])) - 1),
                      scale=float(scale or c.get("scaling_factor", 0.18215)), shift=float(c.get("shift_factor") or 0.0))


class LatentCodec:
    def __init__(self, path: str, device: torch.device, scale: float = 0.0) -> None:
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ConfigError(f"model.vae needs diffusers: pip install 'bigtrain[diffusers]' ({exc})") from None
        self.spec = latent_spec(path, scale)
        self.vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval().requires_grad_(False)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            mean = self.vae.encode(images.to(self.vae.dtype)).latent_dist.mean
            return ((mean - self.spec.shift) * self.spec.scale).to(images.dtype)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        import torch

        with torch.no_grad():
            return self.vae.decode(latents.to(self.vae.dtype) / self.spec.scale + self.spec.shift).sample.float()
