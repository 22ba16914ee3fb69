"""Diffusion schedules and targets against their closed forms (bigtrain/diffusion/schedules.py)."""

from __future__ import annotations

import math

import pytest
import torch

from bigtrain.diffusion import schedules as S


def test_beta_schedules_match_their_definitions() -> None:
    lin = S.betas("linear", 1000)
    assert lin[0].item() == pytest.approx(1e-4) and lin[-1].item() == pytest.approx(0.02)
    assert S.betas("linear", 500)[-1].item() == pytest.approx(0.04)  # DiT's 1000/T rescale
    sl = S.betas("scaled_linear", 1000)
    assert sl[0].item() == pytest.approx(0.00085) and sl[-1].item() == pytest.approx(0.012)
    cos = S.betas("cosine", 1000)
    assert cos.max().item() <= 0.999 + 1e-7

    def f(t: float) -> float:
        return math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2

    abar = S.alpha_bar(cos)
    for t in (0, 10, 500, 900):
        assert abar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    with pytest.raises(ValueError, match="unknown beta schedule"):
        S.betas("sigmoid")


@pytest.mark.parametrize("prediction", S.PREDICTIONS)
def test_targets_invert_and_ddim_with_the_true_target_lands_on_the_forward_process(prediction: str) -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    abar = S.alpha_bar(S.betas("linear"))
    t, prev = torch.tensor([10, 200, 600, 999]), torch.tensor([0, 150, 500, 950])
    x_t = S.add_noise(x0, eps, abar[t])
    assert torch.allclose(x_t[0], abar[10].sqrt() * x0[0] + (1 - abar[10]).sqrt() * eps[0])
    out = S.target(prediction, x0, eps, abar[t])
    if prediction == "v":
        assert torch.allclose(out, abar[t].sqrt().view(-1, 1, 1, 1) * eps - (1 - abar[t]).sqrt().view(-1, 1, 1, 1) * x0)
    got_x0, got_eps = S.predicted_x0_eps(prediction, out, x_t, abar[t])
    assert torch.allclose(got_x0, x0, atol=2e-4) and torch.allclose(got_eps, eps, atol=2e-4)
    step = S.ddim_step(prediction, out, x_t, abar[t], abar[prev])
    assert torch.allclose(step, S.add_noise(x0, eps, abar[prev]), atol=2e-4)  # eta = 0: deterministic


def test_min_snr_weights() -> None:
    abar = torch.tensor([0.999, 0.9, 0.5, 0.01])
    snr = abar / (1 - abar)
    assert torch.allclose(S.min_snr_weight(abar, "epsilon", 5.0), snr.clamp(max=5) / snr)
    assert torch.allclose(S.min_snr_weight(abar, "v", 5.0), snr.clamp(max=5) / (snr + 1))  # min before + 1
    assert torch.allclose(S.min_snr_weight(abar, "sample", 5.0), snr.clamp(max=5))


def test_flow_matching_endpoints_velocity_and_sigma_sampling() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, generator=g), torch.randn(2, 4, generator=g)
    assert torch.equal(S.flow_interpolate(x0, eps, torch.zeros(2)), x0)
    assert torch.equal(S.flow_interpolate(x0, eps, torch.ones(2)), eps)
    h = 1e-3
    sigma = torch.tensor([0.3, 0.7])
    fd = (S.flow_interpolate(x0, eps, sigma + h) - S.flow_interpolate(x0, eps, sigma - h)) / (2 * h)
    assert torch.allclose(fd, S.flow_target(x0, eps), atol=1e-3)
    a = S.sample_sigma(20000, torch.Generator().manual_seed(1))
    b = S.sample_sigma(20000, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and 0 < a.min() and a.max() < 1
    logit = torch.log(a / (1 - a))
    assert abs(logit.mean().item()) < 0.03 and logit.std().item() == pytest.approx(1.0, abs=0.03)
