"""The DiT backbone (bigtrain/models/dit.py): the paper's parameter counts and compute, adaLN-Zero's
identity at initialisation, and the layouts of the timestep features and of unpatchify."""

from __future__ import annotations

import pytest
import torch

from bigtrain.models.args import DiTArgs, dit_args
from bigtrain.models.dit import DiT, timestep_embedding


@pytest.mark.parametrize("name,millions", [("S/2", 33.0), ("B/2", 130.5), ("L/2", 458.1), ("XL/2", 675.1),
                                           ("XL/8", 675.1)])
def test_presets_match_the_papers_parameter_counts(name: str, millions: float) -> None:
    """4x32x32 latents, 1000 classes, learned sigma (the paper's setting); patch size barely matters."""
    with torch.device("meta"):
        model = DiT(dit_args(name))
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(millions * 1e6, rel=0.005)


@pytest.mark.parametrize("name,gmacs", [("S/4", 1.4), ("B/4", 5.6), ("L/4", 19.7), ("XL/4", 29.1), ("XL/2", 118.64)])
def test_compute_matches_the_papers_gflops_which_count_multiply_accumulates(name: str, gmacs: float) -> None:
    with torch.device("meta"):
        model = DiT(dit_args(name))
    assert model.macs_per_forward() / 1e9 == pytest.approx(gmacs, rel=0.02)
    assert model.train_flops_per_sample() == 6 * model.macs_per_forward()


def _tiny() -> DiT:
    torch.manual_seed(0)
    return DiT(DiTArgs(depth=2, width=32, num_heads=2, patch_size=2, input_size=8, in_channels=3, num_classes=10))


def test_adaln_zero_blocks_start_as_the_identity_and_the_output_as_zero() -> None:
    model = _tiny()
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 3, 9, 10])  # 10: null class
    out = model(x, t, y)
    assert out.shape == (4, 6, 8, 8) and torch.equal(out, torch.zeros_like(out))  # learned sigma: 2 x channels
    h, c = torch.randn(4, 16, 32), model.condition(t, y)
    for block in model.blocks.values():
        assert torch.equal(block(h, c), h)
    # the zero gates still learn: one step moves them, after which the blocks do something
    (out - torch.randn_like(out)).pow(2).mean().backward()
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    assert model.blocks["0"].attn.q.weight.grad.abs().sum() == 0  # gated off at step 0, as in the paper
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad if p.grad is not None else 0
    assert model(x, t, y).abs().sum() > 0


def test_timestep_features_are_cos_then_sin() -> None:
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))
    assert emb[1, 0] == pytest.approx(torch.cos(torch.tensor(3.0)).item()) and emb[1, 4] == pytest.approx(
        torch.sin(torch.tensor(3.0)).item())


def test_unpatchify_inverts_the_token_layout() -> None:
    model = _tiny()
    x = torch.randn(2, 6, 8, 8)  # out_channels = 6
    p, g = 2, 4
    tokens = x.reshape(2, 6, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(2, g * g, p * p * 6)  # (h, w) tokens of (p, q, c)
    assert torch.equal(model.unpatchify(tokens), x)
