import pytest
import torch

from bigtrain.models.args import VIT_SIZES, ViTArgs
from bigtrain.models.vit import ViT


def test_size_table_matches_paper() -> None:
    assert VIT_SIZES["G"] == (1664, 48, 8192, 16)
    assert VIT_SIZES["g"] == (1408, 40, 6144, 16)
    assert VIT_SIZES["B"] == (768, 12, 3072, 12)
    assert set(VIT_SIZES) >= {"Ti", "S", "B", "L", "H", "g", "G"}


def test_vit_g14_parameter_count_on_meta() -> None:
    with torch.device("meta"):
        model = ViT(ViTArgs.from_variant("G", patch_size=14, image_size=224, num_classes=1000, head="gap"))
    # "Scaling Vision Transformers" table 2: ViT-G/14 has 1843M parameters (trunk).
    assert model.num_params(trunk_only=True) == pytest.approx(1.843e9, rel=2e-3)
    assert model.num_params() == pytest.approx(1.84e9, rel=5e-3)
    # the paper reports 965.3 GFLOPs per forward at 224px; training ~ 3x forward
    assert model.train_flops_per_sample() / 3 == pytest.approx(965.3e9, rel=0.01)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("variant", ["Ti", "S", "M", "B", "L", "H", "g"])
def test_other_sizes_follow_the_table(variant: str) -> None:
    width, depth, mlp, _ = VIT_SIZES[variant]
    with torch.device("meta"):
        model = ViT(ViTArgs.from_variant(variant, patch_size=14, head="gap"))
    block = 4 * width * width + 2 * width * mlp  # attention + MLP weights, biases/norms aside
    assert model.num_params(trunk_only=True) == pytest.approx(depth * block, rel=0.04)


@pytest.mark.parametrize("head", ["cls", "gap", "map"])
def test_heads_shapes_and_gradients(head: str) -> None:
    torch.manual_seed(0)
    args = ViTArgs(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=4, image_size=16, in_channels=3, num_classes=7, head=head, head_zero_init=False)
    model = ViT(args)
    x = torch.randn(5, 3, 16, 16)
    logits = model(x)
    assert logits.shape == (5, 7)
    assert model.features(x).shape == (5, 32)
    logits.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, f"parameters without gradient: {missing}"
    assert ("cls_token" in dict(model.named_parameters())) == (head == "cls")
    assert ("pool.probe" in dict(model.named_parameters())) == (head == "map")


def test_map_head_is_permutation_invariant_over_tokens() -> None:
    torch.manual_seed(0)
    model = ViT(ViTArgs(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, in_channels=1, num_classes=3))
    tokens = torch.randn(2, 16, 32)
    perm = torch.randperm(16)
    assert torch.allclose(model.pool(tokens), model.pool(tokens[:, perm]), atol=1e-5)


def test_blocks_have_stable_names() -> None:
    model = ViT(ViTArgs(width=32, depth=3, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, in_channels=1, num_classes=3))
    assert list(model.blocks.keys()) == ["0", "1", "2"]
    assert "blocks.2.attn.q.weight" in model.state_dict()


def test_sincos_posemb_is_a_buffer() -> None:
    model = ViT(ViTArgs(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, in_channels=1, num_classes=3, posemb="sincos2d"))
    assert "pos_embed" not in dict(model.named_parameters())
    assert model(torch.randn(1, 1, 16, 16)).shape == (1, 3)


def test_invalid_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        ViTArgs.from_variant("custom", width=30, depth=1, mlp_dim=8, num_heads=4)
    with pytest.raises(ValueError, match="patch_size"):
        ViTArgs.from_variant("Ti", patch_size=15, image_size=224)
    with pytest.raises(ValueError, match="unknown ViT variant"):
        ViTArgs.from_variant("XL")
