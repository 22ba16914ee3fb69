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


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).view(-1, *[1] * (like.ndim - 1))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, per sample."""
    return bcast(abar_t.sqrt(), x0) * x0 + bcast((1 - abar_t).sqrt(), x0) * eps


def target(prediction: str, x0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor) -> torch.Tensor:
    if prediction == "epsilon":
        return eps
    if prediction == "v":
        return bcast(abar_t.sqrt(), x0) * eps - bcast((1 - abar_t).sqrt(), x0) * x0
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
    a, s = bcast(abar_t.sqrt(), x_t), bcast((1 - abar_t).sqrt(), x_t)
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
    return bcast(abar_prev.sqrt(), x_t) * x0 + bcast((1 - abar_prev).sqrt(), x_t) * eps


def flow_interpolate(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps (sigma = 0: data, 1: noise)."""
    return (1 - bcast(sigma, x0)) * x0 + bcast(sigma, x0) * eps


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


# --- learned variance (improved DDPM / DiT's learn_sigma): the variational bound term -------------

def posterior_log_variance(beta: torch.Tensor, abar: torch.Tensor, abar_prev: torch.Tensor) -> torch.Tensor:
    """log of q(x_{t-1} | x_t, x0)'s variance beta (1 - abar_prev) / (1 - abar) along a chain of steps
    (ascending t), with the first entry (0 at t = 0) replaced by the second, as improved DDPM clips it."""
    var = beta.double() * (1 - abar_prev.double()) / (1 - abar.double())
    if var.numel() > 1:
        var = torch.cat([var[1:2], var[1:]])
    return var.log().float()


def model_log_variance(frac_out: torch.Tensor, min_log: torch.Tensor, max_log: torch.Tensor) -> torch.Tensor:
    """The learned log-variance: the network's extra channels v in [-1, 1] interpolate between the
    clipped posterior log-variance and log beta: (v + 1)/2 max + (1 - (v + 1)/2) min."""
    frac = (frac_out + 1) / 2
    return frac * bcast(max_log, frac_out) + (1 - frac) * bcast(min_log, frac_out)


def posterior_mean(x0: torch.Tensor, x_t: torch.Tensor, beta_t: torch.Tensor, abar_t: torch.Tensor,
                   abar_prev: torch.Tensor) -> torch.Tensor:
    c0 = beta_t * abar_prev.sqrt() / (1 - abar_t)
    ct = (1 - abar_prev) * (1 - beta_t).sqrt() / (1 - abar_t)
    return bcast(c0, x0) * x0 + bcast(ct, x_t) * x_t


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_var: torch.Tensor) -> torch.Tensor:
    """-log p(x) of data in [-1, 1] quantised to 256 levels under N(mean, exp(log_var)), elementwise
    (the decoder term of the bound at t = 0)."""
    inv_std = torch.exp(-0.5 * log_var)
    centered = x - mean
    cdf_plus = _approx_std_normal_cdf(inv_std * (centered + 1 / 255))
    cdf_min = _approx_std_normal_cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()
    log_one_minus_cdf_min = (1 - cdf_min).clamp(min=1e-12).log()
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return -torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def vlb_bits(x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, eps_pred: torch.Tensor, var_out: torch.Tensor,
             beta: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """Per sample, the variational-bound term of the hybrid loss in bits per dimension: KL(q(x_{t-1} |
    x_t, x0) || p(x_{t-1} | x_t)) for t > 0 and the decoder NLL at t = 0. ``eps_pred`` should be
    detached (DiT / improved DDPM train the mean by the MSE alone and the variance by this term)."""
    abar_prev_all = torch.cat([abar.new_ones(1), abar[:-1]])
    log_post_all = posterior_log_variance(beta, abar, abar_prev_all).to(x0.device)
    beta, abar, abar_prev_all = beta.to(x0.device), abar.to(x0.device), abar_prev_all.to(x0.device)
    b, a, ap = beta[t], abar[t], abar_prev_all[t]
    x0_pred = (x_t - bcast((1 - a).sqrt(), x_t) * eps_pred) / bcast(a.sqrt(), x_t)
    mean_p = posterior_mean(x0_pred, x_t, b, a, ap)
    log_var_p = model_log_variance(var_out, log_post_all[t], b.log())
    mean_q = posterior_mean(x0, x_t, b, a, ap)
    log_var_q = bcast(log_post_all[t], x0)
    kl = 0.5 * (-1.0 + log_var_p - log_var_q + torch.exp(log_var_q - log_var_p)
                + (mean_q - mean_p).pow(2) * torch.exp(-log_var_p))
    nll = discretized_gaussian_nll(x0, mean_p, log_var_p)
    dims = tuple(range(1, x0.ndim))
    at_zero = (t == 0).to(x0.device).view(-1, *[1] * (x0.ndim - 1)).expand_as(kl)
    per = torch.where(at_zero, nll, kl)
    return per.mean(dim=dims) / math.log(2.0)
