"""Denoising objectives: DDPM (epsilon / v / x0 prediction, optional min-SNR weights and learned
variance) and rectified flow, for any model called ``model(x, t, y)``.

Every random draw of a training sample — its noise, its timestep (or noise level) and whether its
label is dropped to the null class — arrives in the batch (``noise``, ``u``, ``z``, ``drop``,
drawn by the loader from (seed, sample position)), so the loss of a sample is the same on every
layout, micro-batch size and resume. The task only turns them into the objective:

* ddpm: t = floor(u T); x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; MSE to the prediction target
  (min(SNR, gamma)-weighted when ``min_snr_gamma`` > 0); with learned variance (the model returns
  twice the channels) plus the variational-bound term on the detached mean (DiT's hybrid loss).
* flow: sigma = sigmoid(mean + std z) (logit-normal) or u; x = (1 - sigma) x0 + sigma eps; MSE to
  the velocity eps - x0; the model sees t = 1000 sigma.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bigtrain.config.schema import DiffusionConfig
from bigtrain.diffusion import schedules as S


class DiffusionTask(nn.Module):
    """``encode`` maps the batch's images to the space the model denoises (a VAE's latents), or
    None for pixel space; ``null_class`` None: an unconditional model (labels are not used)."""

    def __init__(self, model: nn.Module, cfg: DiffusionConfig, null_class: int | None, learn_sigma: bool = False,
                 encode: Callable[[torch.Tensor], torch.Tensor] | None = None, drop_labels: bool = True) -> None:
        super().__init__()
        if learn_sigma and (cfg.objective != "ddpm" or cfg.prediction != "epsilon"):
            raise ValueError("a learned variance (model.learn_sigma) needs diffusion.objective=ddpm and "
                             "diffusion.prediction=epsilon (DiT's hybrid loss)")
        self.model, self.cfg, self.null_class, self.learn_sigma = model, cfg, null_class, learn_sigma
        self.encode, self.drop_labels = encode, drop_labels
        beta = S.betas(cfg.schedule, cfg.timesteps)
        first = next(model.parameters(), None)  # the schedule lives where the batch's timesteps index it
        device = first.device if first is not None else torch.device("cpu")
        self.register_buffer("beta", beta.to(device), persistent=False)
        self.register_buffer("abar", S.alpha_bar(beta).to(device), persistent=False)

    def labels(self, batch: dict[str, Any]) -> torch.Tensor:
        y = batch["label"]
        if self.null_class is None:
            return torch.zeros_like(y)
        if self.drop_labels and self.cfg.label_dropout > 0:
            y = torch.where(batch["drop"].to(y.device) < self.cfg.label_dropout, torch.full_like(y, self.null_class), y)
        return y

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        x0 = batch["latent"] if "latent" in batch else batch["image"]
        if self.encode is not None and "latent" not in batch:
            x0 = self.encode(x0)
        eps, y = batch["noise"].to(x0.dtype), self.labels(batch)
        c = self.cfg
        logs: dict[str, torch.Tensor] = {}
        if c.objective == "flow":
            z, u = batch["z"].double(), batch["u"].double()
            sigma = (torch.sigmoid(c.flow_mean + c.flow_std * z) if c.flow_sigma == "logit_normal" else u).float()
            sigma = sigma.to(x0.device)
            out = self.model(S.flow_interpolate(x0, eps, sigma), 1000.0 * sigma, y).float()
            per_sample = (out - S.flow_target(x0, eps).float()).pow(2).flatten(1).mean(1)
            mse = per_sample
        else:
            t = (batch["u"].double() * c.timesteps).long().clamp(max=c.timesteps - 1).to(x0.device)
            abar_t = self.abar[t]
            x_t = S.add_noise(x0, eps, abar_t)
            out = self.model(x_t, t.to(x0.dtype), y).float()
            channels = x0.shape[1]
            pred = out[:, :channels]
            mse = (pred - S.target(c.prediction, x0, eps, abar_t).float()).pow(2).flatten(1).mean(1)
            per_sample = mse * S.min_snr_weight(abar_t, c.prediction, c.min_snr_gamma) if c.min_snr_gamma else mse
            if self.learn_sigma:
                vb = S.vlb_bits(x0.float(), x_t.float(), t, pred.detach(), out[:, channels:], self.beta, self.abar)
                per_sample = per_sample + vb
                logs["vb"] = vb
        weight = batch["weight"].to(per_sample.device)
        denom = weight.sum().clamp_min(1.0)
        result = {"loss": (per_sample * weight).sum() / denom, "mse": (mse.detach() * weight).sum() / denom}
        result.update({k: (v.detach() * weight).sum() / denom for k, v in logs.items()})
        return result
