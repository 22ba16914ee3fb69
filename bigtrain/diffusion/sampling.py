"""Samplers for diffusion and flow models, with classifier-free guidance.

A model is called ``model(x, t, y)``: noisy inputs, per-sample timesteps (DDPM step indices, or
1000 sigma for flow models) and labels (``null`` = unconditional). Every sample's starting noise
(and, for the ancestral sampler, its noise at each step) comes from its own generator seeded by
(seed, sample index), so a sample does not depend on the batch it was generated in, the number of
ranks that shared the work, or how many other samples were asked for.

* ``ddim``: deterministic DDIM (eta 0) on an evenly spaced chain of ``steps`` timesteps from T - 1
  down to 0 (the noisiest step is always visited: the linear and cosine schedules do not reach
  zero signal-to-noise, and starting lower would skip the part that makes the image).
* ``ddpm``: ancestral sampling on the same chain, the betas respaced as DiT's ``respace.py`` does
  (beta'_i = 1 - abar_i / abar_{i-1}); the posterior variance, or the learned one when the model
  has the extra channels (``learn_sigma``).
* ``euler``: the rectified-flow ODE dx/dsigma = v from sigma = 1 (noise) to 0 (data) in ``steps``
  equal steps.

Guidance: out = uncond + scale (cond - uncond) on every predicted channel (DiT's reference code
guided only the first 3 of 4 latent channels, a GLIDE leftover; here it is all of them, and the
learned-variance channels are the conditional ones). Scale 1 runs the conditional model alone,
so it equals the conditional prediction exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from bigtrain.diffusion import schedules as S

SAMPLERS = ("ddim", "ddpm", "euler")
Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def sample_noise(indices: Sequence[int], shape: Sequence[int], seed: int, step: int = -1) -> torch.Tensor:
    """Standard normal noise of ``shape`` per sample, from (seed, index[, step]) alone."""
    key = [] if step < 0 else [step]
    return torch.from_numpy(np.stack([np.random.default_rng([seed, int(i), 17, *key]).standard_normal(tuple(shape), dtype=np.float32)
                                      for i in indices]))


def guided(model: Model, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, scale: float, null: int | None,
           channels: int) -> torch.Tensor:
    """The classifier-free guided output (one batched call for the conditional and unconditional halves)."""
    if scale == 1.0 or null is None:
        return model(x, t, y)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]))
    cond, uncond = out.float().chunk(2)
    mixed = uncond[:, :channels] + scale * (cond[:, :channels] - uncond[:, :channels])
    return torch.cat([mixed, cond[:, channels:]], dim=1)


def timestep_chain(timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` DDPM step indices, evenly spaced from T - 1 down to 0 (descending, distinct)."""
    if not 0 < steps <= timesteps:
        raise ValueError(f"sampling steps must be in [1, {timesteps}], got {steps}")
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long().unique_consecutive()


@torch.no_grad()
def generate(model: Model, labels: torch.Tensor, indices: Sequence[int], shape: Sequence[int], *, objective: str,
             prediction: str = "epsilon", schedule: str = "linear", timesteps: int = 1000, sampler: str = "auto",
             steps: int = 50, guidance: float = 1.0, null: int | None = None, seed: int = 0, clip: bool = True,
             device: torch.device | None = None, on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Samples (B, *shape) for ``labels`` (B,), sample ``i`` seeded by (seed, indices[i]);
    ``on_step`` is called after each denoising step (progress)."""
    tick = on_step or (lambda: None)
    device = device or labels.device
    sampler = ("ddim" if objective == "ddpm" else "euler") if sampler == "auto" else sampler
    if (sampler == "euler") != (objective == "flow"):
        raise ValueError(f"sampler {sampler!r} does not sample a {objective!r} model (ddim/ddpm: ddpm; euler: flow)")
    x = sample_noise(indices, shape, seed).to(device)
    labels = labels.to(device)
    channels = shape[0]
    if sampler == "euler":
        sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
        for s, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
            t = torch.full((x.shape[0],), 1000.0 * s, device=device)
            v = guided(model, x, t, labels, guidance, null, channels)[:, :channels].float()
            x = x + (s_next - s) * v
            tick()
        return x.clamp(-1, 1) if clip else x
    abar_all = S.alpha_bar(S.betas(schedule, timesteps))
    chain = timestep_chain(timesteps, steps)  # descending
    up = chain.flip(0)  # the respaced chain, ascending
    abar_c = abar_all[up].double()
    abar_prev_c = torch.cat([abar_c.new_ones(1), abar_c[:-1]])
    beta_c = 1 - abar_c / abar_prev_c
    log_post_c = S.posterior_log_variance(beta_c, abar_c, abar_prev_c)
    for j in range(len(up) - 1, -1, -1):
        t = torch.full((x.shape[0],), float(up[j]), device=device)
        out = guided(model, x, t, labels, guidance, null, channels).float()
        tick()
        a, ap = abar_c[j].float().to(device).expand(x.shape[0]), abar_prev_c[j].float().to(device).expand(x.shape[0])
        x0, eps = S.predicted_x0_eps(prediction, out[:, :channels], x, a)
        if clip:
            x0 = x0.clamp(-1, 1)
            eps = (x - S.bcast(a.sqrt(), x) * x0) / S.bcast((1 - a).sqrt(), x)
        if sampler == "ddim":
            x = S.bcast(ap.sqrt(), x) * x0 + S.bcast((1 - ap).sqrt(), x) * eps
            continue
        mean = S.posterior_mean(x0, x, beta_c[j].float().to(device).expand(x.shape[0]), a, ap)
        if out.shape[1] > channels:  # learned variance
            log_var = S.model_log_variance(out[:, channels:], log_post_c[j].to(device).expand(x.shape[0]),
                                           beta_c[j].float().log().to(device).expand(x.shape[0]))
        else:
            log_var = S.bcast(log_post_c[j].to(device).expand(x.shape[0]), x)
        x = mean if j == 0 else mean + torch.exp(0.5 * log_var) * sample_noise(indices, shape, seed, step=j).to(device)
    return x
