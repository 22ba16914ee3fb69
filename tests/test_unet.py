"""The UNet family: a diffusers UNet2DConditionModel + CLIP text encoder built from configs (no
download), the SDXL preset's size, ScaleLong's skip scaling (kappa = 1 is the plain model bit for
bit; exponents run from 0 at the outermost skip), the learnable gate, and ZeRO-3 parity with EMA."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bigtrain.models.unet import ConditionedUNet, UNetArgs  # noqa: E402
from conftest import parity  # noqa: E402

TINY = dict(channels=(16, 32), attention=(False, True), transformer_layers=(1, 1), head_dim=8, norm_groups=8,
            cross_attention_dim=32, text_width=32, text_layers=1, text_heads=2, image_size=16)


def _model(**kw: object) -> ConditionedUNet:
    torch.manual_seed(0)
    return ConditionedUNet(UNetArgs(**{**TINY, **kw})).eval()


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 1, 16, 16, generator=g), torch.tensor([3.0, 400.0, 999.0]), torch.tensor([0, 7, 10])


def test_tiny_unet_builds_from_a_config_and_keeps_the_image_shape() -> None:
    model = _model()
    x, t, y = _inputs()
    with torch.no_grad():
        out = model(x, t, y)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.captions(y).tolist() == [[1, 3, 2, 0], [1, 10, 2, 0], [1, 2, 0, 0]]  # label 10 = null: empty caption


def test_sdxl_preset_has_the_sdxl_unet_size_and_needs_its_added_conditions() -> None:
    from bigtrain.families.unet import unet_args
    from bigtrain.families.unet.config import PRESETS, UNetConfig

    m = UNetConfig(variant="sdxl", image_size=128, in_channels=4, num_classes=10, **PRESETS["sdxl"])
    with torch.device("meta"):
        model = ConditionedUNet(unet_args(m))
    unet = sum(p.numel() for p in model.unet.parameters())
    assert unet == pytest.approx(2.567e9, rel=0.005), unet  # SDXL-base's UNet: 2,567,463,684 parameters
    with torch.device("meta"), pytest.raises(ValueError, match="text_embeds"):
        model.unet(torch.zeros(1, 4, 128, 128), torch.zeros(1), encoder_hidden_states=torch.zeros(1, 4, 2048),
                   added_cond_kwargs={})


def test_scalelong_kappa_one_is_the_plain_unet_bit_for_bit() -> None:
    x, t, y = _inputs()
    with torch.no_grad():
        plain = _model()(x, t, y)
        assert torch.equal(_model(skip_scaling="exponential", skip_kappa=1.0)(x, t, y), plain)
        assert not torch.equal(_model(skip_scaling="exponential", skip_kappa=0.5)(x, t, y), plain)


def _skips_seen(model: ConditionedUNet) -> list[tuple[torch.Tensor, ...]]:
    seen: list[tuple[torch.Tensor, ...]] = []
    for block in model.unet.up_blocks:  # registered after the scaling hooks: sees what the block gets
        block.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["res_hidden_states_tuple"]), with_kwargs=True)
    x, t, y = _inputs()
    with torch.no_grad():
        model(x, t, y)
    return seen


@pytest.mark.parametrize("mode,kappa", [("exponential", 0.5), ("constant", 0.5)])
def test_scalelong_coefficients_grow_in_exponent_from_the_outermost_skip(mode: str, kappa: float) -> None:
    plain, scaled = _skips_seen(_model()), _skips_seen(_model(skip_scaling=mode, skip_kappa=kappa))
    model = _model()
    order = model._skips_per_up_block()
    assert order[-1][0] == 0  # the last up block receives the outermost skip (conv_in's output)
    assert sorted(i for ids in order for i in ids) == list(range(len(model.skip_channels)))
    for ids, a, b in zip(order, plain, scaled):
        for i, s, s_scaled in zip(ids, a, b):
            expect = kappa ** i if mode == "exponential" else 2 ** -0.5
            assert torch.allclose(s_scaled, s * expect, rtol=1e-6, atol=0), (i, expect)


def test_learnable_gates_start_at_one_half_stay_in_the_unit_interval_and_learn() -> None:
    plain, gated = _skips_seen(_model()), _skips_seen(_model(skip_scaling="learnable"))
    for a, b in zip(plain, gated):
        for s, g in zip(a, b):
            assert torch.allclose(g, 0.5 * s, atol=1e-6)
    model = _model(skip_scaling="learnable").train()
    x, t, y = _inputs()
    model(x, t, y).square().mean().backward()
    grads = [p.grad for gate in model.skip_gates for p in gate.fc2.parameters()]
    assert all(g is not None for g in grads) and any(float(g.abs().sum()) > 0 for g in grads)
    gate = model.skip_gates[0]
    torch.nn.init.normal_(gate.fc2.weight, std=10.0)
    out = gate(torch.randn(4, gate.fc1.in_features, 3, 3).abs())
    assert bool(torch.isfinite(out).all())


UNET = ["model.variant=debug", "model.image_size=16", "data.image_size=16", "data.augment=none",
        "train.global_batch_size=8", "train.steps=3", "ema.decay=0.8", "schedule.warmup_steps=1",
        "schedule.cooldown_steps=0", "log.every_steps=1", "eval.final=false", "optim.lr=0.003", "parallel.timeout_s=120"]


@pytest.mark.parametrize("scaling", ["learnable"])
def test_unet_zero3_with_ema_matches_one_process(tmp_path: Path, digits_dir: str, scaling: str) -> None:
    config = tmp_path / "unet.yaml"
    config.write_text(f"model:\n  family: unet\ndata:\n  dir: {digits_dir}\n")
    results, _, _ = parity(config, [*UNET, f"model.skip_scaling={scaling}"], [["parallel.dp=2", "parallel.zero=3"]],
                           tmp_path)
    r = results["parallel.dp=2 parallel.zero=3"]
    print({k: r[k] for k in ("max_loss_rel_diff", "param_update_rel_diff", "ema_rel_diff")})
    assert r["steps"] == 3 and r["same_keys"] and r["ema_same_keys"], r
    assert r["max_loss_rel_diff"] <= 1e-5 and r["param_update_rel_diff"] <= 1e-4 and r["ema_rel_diff"] <= 1e-5, r
