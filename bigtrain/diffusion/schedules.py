"""Noise schedules, training targets and the deterministic DDIM step, as closed forms.

* Discrete-time diffusion (DDPM) over T steps: betas ``linear`` (DDPM's 1e-4 -> 0.02, rescaled by
  1000/T as DiT does), ``cosine`` (Nichol & Dhariwal's squared-cosine alpha-bar, betas capped at
  0.999) or ``scaled_linear`` (Stable Diffusion: linspace of square roots, squared); x_t =
  sqrt(abar_t) x0 + sqrt(1 - abar_t) eps; targets eps, v = sqrt(abar) eps - sqrt(1 - abar) x0, or x0.
* Min-SNR-gamma loss weights (Hang et al.): SNR = abar / (1 - abar); min(SNR, gamma) / SNR for eps,
  min(SNR, gamma) / (SNR + 1) for v (the minimum taken before the + 1), min(SNR, gamma) for x0.
* Rectified flow (SD3's convention): x_sigma = (1 - sigma) x0 + sigma eps, sigma = 0 data and 1 noise,
  velocity target eps - x0; sigma drawn logit-normal (sigmoid of N(m, s)) or uniform.

Everything is computed in float64 and returned in float32 (schedules) or in the inputs' dtype.
"""

from __future__ import annotations

import math

import torch

BETA_SCHEDULES = ("linear", "cosine", "scaled_linear")
PREDICTIONS = ("epsilon", "v", "sample")


def betas(kind: str, steps: int = 1000) -> torch.Tensor:
    if kind == "linear":
        scale = 1000.0 / steps
        return torch.linspace(1e-4 * scale, 0.02 * scale, steps, dtype=torch.float64).float()
    if kind == "scaled_linear":
        return (torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, steps, dtype=torch.float64) ** 2).float()
    if kind == "cosine":
        def abar(t: float) -> float:
            return math.cos((t / steps + 0.008) / 1.008 * math.pi / 2) ** 2

        return torch.tensor([min(1 - abar(i + 1) / abar(i), 0.999) for i in range(steps)], dtype=torch.float64).float()
    raise ValueError(f"unknown beta schedule {kind!r}; choose from {BETA_SCHEDULES}")


def alpha_bar(beta: torch.Tensor) -> torch.Tensor:
    """Cumulative product of 1 - beta (computed in float64)."""
    return torch.cumprod(1.0 - beta.double(), dim=0).float()


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample."""
    return _bcast(abar_t.sqrt(), x0) * x0 + _bcast((1 - abar_t).sqrt(), x0) * eps


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return _bcast(abar_t.sqrt(), x0) * eps - _bcast((1 - abar_t).sqrt(), x0) * x0
    if prediction == "sample":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}; choose from {PREDICTIONS}")


def min_snr_weight(abar_t: torch.Tensor, prediction: str, gamma: float) -> torch.Tensor:
    snr = abar_t.double() / (1 - abar_t.double())
    clipped = snr.clamp(max=gamma)
    weight = {"epsilon": clipped / snr, "v": clipped / (snr + 1), "sample": clipped}[prediction]
    return weight.float()


def predicted_x0_eps(prediction: str, out: torch.Tensor, x_t: torch.Tensor,
                     abar_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by a model output of the given prediction type at x_t."""
    a, s = _bcast(abar_t.sqrt(), x_t), _bcast((1 - abar_t).sqrt(), x_t)
    if prediction == "epsilon":
        return (x_t - s * out) / a, out
    if prediction == "v":
        x0 = a * x_t - s * out
        return x0, s * x_t + a * out
    if prediction == "sample":
        return out, (x_t - a * out) / s
    raise ValueError(f"unknown prediction type {prediction!r}; choose from {PREDICTIONS}")


def ddim_step(prediction: str, out: torch.Tensor, x_t: torch.Tensor, abar_t: torch.Tensor,
              abar_prev: torch.Tensor) -> torch.Tensor:
    """One deterministic DDIM step (eta = 0): x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev) eps."""
    x0, eps = predicted_x0_eps(prediction, out, x_t, abar_t)
    return _bcast(abar_prev.sqrt(), x_t) * x0 + _bcast((1 - abar_prev).sqrt(), x_t) * eps


def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps (sigma = 0: data, 1: noise)."""
    return (1 - _bcast(sigma, x0)) * x0 + _bcast(sigma, x0) * eps


def flow_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """The velocity d x_sigma / d sigma = eps - x0."""
    return eps - x0


def sample_sigma(n: int, generator: torch.Generator, kind: str = "logit_normal", mean: float = 0.0,
                 std: float = 1.0) -> torch.Tensor:
    """Flow-matching noise levels in (0, 1): logit-normal (SD3's rf/lognorm(0, 1)) or uniform."""
    if kind == "logit_normal":
        return torch.sigmoid(mean + std * torch.randn(n, generator=generator, dtype=torch.float64)).float()
    if kind == "uniform":
        return torch.rand(n, generator=generator, dtype=torch.float64).float()
    raise ValueError(f"unknown sigma sampling {kind!r}; choose logit_normal or uniform")
