import math

import pytest
import torch

from bigtrain.config.schema import OptimConfig
from bigtrain.models.vit import ViT, ViTArgs
from bigtrain.optim import LRSchedule, ScheduleSpec, build_optimizer, lr_factor, param_groups


def factors(spec: ScheduleSpec) -> list[float]:
    return [lr_factor(spec, s) for s in range(spec.total_steps)]


def test_warmup_is_linear_and_reaches_peak() -> None:
    f = factors(ScheduleSpec(100, warmup_steps=10, decay="constant"))
    assert f[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert f[10:] == pytest.approx([1.0] * 90)


def test_cosine_ends_at_final_ratio() -> None:
    spec = ScheduleSpec(100, warmup_steps=0, decay="cosine", final_ratio=0.1)
    f = factors(spec)
    assert f[0] == pytest.approx(1.0)
    assert f[50] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert lr_factor(spec, 100) == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f, f[1:]))


def test_linear_decay() -> None:
    spec = ScheduleSpec(110, warmup_steps=10, decay="linear")
    assert lr_factor(spec, 10) == pytest.approx(1.0)
    assert lr_factor(spec, 60) == pytest.approx(0.5)
    assert lr_factor(spec, 110) == pytest.approx(0.0)


def test_rsqrt_with_cooldown() -> None:
    spec = ScheduleSpec(1000, warmup_steps=100, decay="rsqrt", rsqrt_timescale=100, cooldown_steps=200)
    assert lr_factor(spec, 100) == pytest.approx(1.0)
    assert lr_factor(spec, 400) == pytest.approx(1 / math.sqrt(1 + 300 / 100))
    # cooldown: rsqrt value times the remaining fraction, linearly to zero at the end
    assert lr_factor(spec, 900) == pytest.approx(1 / math.sqrt(1 + 800 / 100) * 100 / 200)
    assert lr_factor(spec, 999) == pytest.approx(1 / math.sqrt(1 + 899 / 100) * 1 / 200)
    f = factors(spec)
    assert all(a >= b for a, b in zip(f[100:], f[101:]))


def test_bad_schedule_rejected() -> None:
    with pytest.raises(ValueError):
        ScheduleSpec(10, warmup_steps=8, cooldown_steps=5)
    with pytest.raises(ValueError):
        ScheduleSpec(10, decay="exp")


def small_vit(head: str = "map") -> ViT:
    return ViT(ViTArgs(width=32, depth=2, mlp_dim=64, num_heads=2, patch_size=4, image_size=16, in_channels=1, num_classes=10, head=head))


def test_param_groups_split_decay_and_head() -> None:
    model = small_vit()
    groups = {g["group"]: g for g in param_groups(model, 0.1, 3.0, 0.5)}
    names = {k: set(g["names"]) for k, g in groups.items()}
    assert names["head_decay"] == {"head.weight"}
    assert names["head_no_decay"] == {"head.bias"}
    assert "pos_embed" in names["no_decay"] and "pool.probe" in names["no_decay"]
    assert "blocks.0.norm1.weight" in names["no_decay"] and "blocks.1.mlp.fc1.bias" in names["no_decay"]
    assert "blocks.0.attn.q.weight" in names["decay"] and "patch_embed.weight" in names["decay"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["head_decay"]["weight_decay"] == 3.0
    assert groups["head_decay"]["lr_mult"] == 0.5 and groups["decay"]["lr_mult"] == 1.0
    every = [n for g in groups.values() for n in g["names"]]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters()), "each parameter in exactly one group"


def test_head_weight_decay_and_lr_mult_take_effect() -> None:
    model = small_vit()
    with torch.no_grad():
        model.head.weight.fill_(1.0)
    cfg = OptimConfig(lr=0.1, weight_decay=0.0, head_weight_decay=2.0, head_lr_mult=0.5)
    opt = build_optimizer(model, cfg)
    sched = LRSchedule(opt, cfg.lr, ScheduleSpec(10, decay="constant"))
    lrs = {g["group"]: g["lr"] for g in opt.param_groups}
    assert lrs["head_decay"] == pytest.approx(0.05) and lrs["decay"] == pytest.approx(0.1)
    body_before = model.blocks["0"].attn.q.weight.detach().clone()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    sched.step()
    # AdamW with zero grad: only decoupled decay moves weights: w *= 1 - lr * wd
    assert torch.allclose(model.head.weight, torch.full_like(model.head.weight, 1 - 0.05 * 2.0))
    assert torch.equal(model.blocks["0"].attn.q.weight, body_before)


def test_schedule_state_roundtrip() -> None:
    model = small_vit()
    opt = build_optimizer(model, OptimConfig(lr=1.0))
    spec = ScheduleSpec(20, warmup_steps=5, decay="cosine")
    a = LRSchedule(opt, 1.0, spec)
    for _ in range(7):
        a.step()
    b = LRSchedule(build_optimizer(model, OptimConfig(lr=1.0)), 1.0, spec)
    b.load_state_dict(a.state_dict())
    assert b.lr == a.lr == pytest.approx(lr_factor(spec, 7))


def test_optimizer_registry_capabilities_and_a_user_optimizer(tiny_cfg) -> None:
    """An optimizer registered from outside bigtrain trains through the public entry points; a layout
    its declared capabilities exclude is refused before any work, naming the keys."""
    import pytest
    import torch

    from bigtrain.config import ConfigError
    from bigtrain.metrics import MetricsLogger
    from bigtrain.optim import OPTIMIZERS, OptimizerSpec, check_optimizer, register_optimizer
    from bigtrain.recipes import build_trainer

    spec = register_optimizer(OptimizerSpec(
        "test_rmsprop", lambda groups, cfg, model: torch.optim.RMSprop(groups, lr=cfg.lr), dtensor=False, tp=False,
    ))
    try:
        check_optimizer("test_rmsprop", tp=1, zero=0, dp=2)
        check_optimizer("test_rmsprop", tp=1, zero=1, dp=2)
        with pytest.raises(ConfigError, match="parallel.tp=2"):
            check_optimizer("test_rmsprop", tp=2, zero=0, dp=1)
        with pytest.raises(ConfigError, match="parallel.zero=3"):
            check_optimizer("test_rmsprop", tp=1, zero=3, dp=2)
        cfg = tiny_cfg("optim.name=test_rmsprop", "train.steps=3", "schedule.cooldown_steps=1", "eval.every_steps=0",
                       "eval.fewshot=false", "checkpoint.every_steps=0", "checkpoint.save_final=false")
        trainer = build_trainer(cfg)
        assert isinstance(trainer.optimizer, torch.optim.RMSprop)
        assert trainer.fit(MetricsLogger(cfg.run.dir, True)) == 0
    finally:
        OPTIMIZERS.pop(spec.name)
