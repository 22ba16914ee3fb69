"""The factored optimizer (big_vision's scale_by_adafactor) against an independent fp64 implementation
of its formulas, and its sharded runs against one process."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, TEST_CONFIG, parity
from bigtrain.optim.factored import Factored, factored_dims

SHAPES = [(64, 48), (40, 16), (3, 48, 40), (32, 32), (50,), (33, 64)]


def round_bf16(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest bfloat16 (ties to even) on the float32 bit pattern, as XLA does."""
    bits = x.float().contiguous().view(torch.int32).to(torch.int64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    return ((bits + 2**31) % 2**32 - 2**31).to(torch.int32).view(torch.float32).double()


def reference_step(p, g, st, t, lr, wd, rel, beta1, bf16_m, min_dim=32, clip=0.0, jax_decay=True):
    """One step of optax's scale_by_factored_rms + ema(debias=False) + big_vision's decoupled decay,
    in float64 (written from the formulas, not from bigtrain's code). With a bf16 momentum and
    ``jax_decay``, JAX's type promotion: optax's ema computes ``decay * mu`` with the Python float
    weakly typed to the bf16 state, so beta1 and the product are rounded to bf16; ``(1 - decay) * u``
    stays fp32 and the sum is fp32 (the update), stored rounded to bf16."""
    beta2 = min(0.999, 1.0 - t ** -0.8)
    g2 = g * g + 1e-30
    shape = tuple(p.shape)
    if len(shape) >= 2 and sorted(shape)[-2] >= min_dim:
        order = sorted(range(len(shape)), key=lambda d: shape[d])
        d1, d0 = order[-2], order[-1]
        st["vr"] = beta2 * st.get("vr", 0.0) + (1 - beta2) * g2.mean(dim=d0)
        st["vc"] = beta2 * st.get("vc", 0.0) + (1 - beta2) * g2.mean(dim=d1)
        rd1 = d1 - 1 if d1 > d0 else d1
        row_factor = (st["vr"] / st["vr"].mean(dim=rd1, keepdim=True)) ** -0.5
        u = g * row_factor.unsqueeze(d0) * (st["vc"] ** -0.5).unsqueeze(d1)
    else:
        st["v"] = beta2 * st.get("v", 0.0) + (1 - beta2) * g2
        u = g * st["v"] ** -0.5
    if clip:
        u = u / max(1.0, float(u.pow(2).mean().sqrt()) / clip)
    prev = st.get("m", torch.zeros_like(p))
    decayed = round_bf16(round_bf16(torch.tensor(beta1)) * prev) if bf16_m and jax_decay else beta1 * prev
    m = decayed + (1 - beta1) * u
    st["m"] = m.to(torch.bfloat16).double() if bf16_m else m
    return p - lr * m - rel * wd * p


def test_bf16_rounding_reproduction_matches_the_promotion_rule() -> None:
    assert float(round_bf16(torch.tensor(0.9))) == 0.8984375  # what big_vision's 0.9 decay becomes
    x = torch.randn(10000, generator=torch.Generator().manual_seed(0)) * 100
    assert torch.equal(round_bf16(x), x.to(torch.bfloat16).double())


@pytest.mark.parametrize("jax_decay", [True, False])
def test_bf16_decay_is_big_vision_arithmetic_by_default(jax_decay: bool) -> None:
    """A constant gradient: the momentum converges to u * 0.1 / (1 - decay). Under big_vision's
    arithmetic (the default) decay = 0.8984375, so m settles 1.5% below the fp32-decay value; each
    mode matches its reference to one bf16 ulp, and the two are told apart."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(64, 48, generator=gen))
    g = torch.randn(64, 48, generator=gen)
    kwargs = {} if jax_decay else {"decay_in_momentum_dtype": False}
    opt = Factored([{"params": [p], "lr": 0.0, "base_lr": 0.0}], beta1=0.9, **kwargs)
    assert opt.decay_in_momentum_dtype == jax_decay
    st: dict = {}
    ref = p.detach().double().clone()
    for t in range(1, 151):
        p.grad = g.clone()
        opt.step()
        ref = reference_step(ref, g.double(), st, t, 0.0, 0.0, 0.0, 0.9, True, jax_decay=jax_decay)
    m = opt.state[p]["m"].double()
    _, other = {}, {}
    for t in range(1, 151):
        reference_step(ref, g.double(), other, t, 0.0, 0.0, 0.0, 0.9, True, jax_decay=not jax_decay)
    ulp = 2.0 ** (torch.floor(torch.log2(st["m"].abs())) - 7)
    assert ((m - st["m"]).abs() <= ulp * 1.01).all()
    ratio = float((m / other["m"]).median())
    assert abs(ratio - (0.985 if jax_decay else 1 / 0.985)) < 4e-3, ratio


@pytest.mark.parametrize("bf16_m,clip,jax_decay", [(False, 0.0, True), (True, 0.0, True), (True, 0.0, False),
                                                   (False, 0.5, True)])
def test_matches_fp64_formulas_over_20_steps(bf16_m: bool, clip: float, jax_decay: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    opt = Factored([{"params": params, "lr": 0.01, "base_lr": 0.02, "weight_decay": 0.3}], beta1=0.9,
                   momentum_dtype=torch.bfloat16 if bf16_m else torch.float32, clip_threshold=clip,
                   decay_in_momentum_dtype=jax_decay)
    ref = [p.detach().double().clone() for p in params]
    states: list[dict] = [{} for _ in params]
    for t in range(1, 21):
        lr = 0.02 * min(1.0, t / 5)  # a warmup: the decay follows lr / base_lr
        opt.param_groups[0]["lr"] = lr
        for i, p in enumerate(params):
            g = torch.randn(p.shape, generator=gen) * (1 + i)
            p.grad = g.clone()
            ref[i] = reference_step(ref[i], g.double(), states[i], t, lr, 0.3, lr / 0.02, 0.9, bf16_m, clip=clip,
                                    jax_decay=jax_decay)
        opt.step()
    # fp32 momentum: 1e-6. bf16 momentum: where bigtrain's fp32 value and the fp64 reference's straddle
    # a bf16 rounding boundary the stored momenta differ by one bf16 ulp (0.4%). Under JAX's rule the
    # decayed term is itself rounded to bf16, so such a one-ulp difference persists instead of
    # fading: one element out of 3072 at step 1 moves the weight-decayed (shrunk) parameters by
    # ~2e-4 relative, and its momentum drifts a few ulps from the reference's. The stored momenta are
    # checked element by element instead: at most 0.5% of them differ, by at most 8 bf16 ulps.
    tol = (5e-4 if jax_decay else 5e-6) if bf16_m else 1e-6
    if bf16_m:
        for p, st in zip(params, states):
            m, r = opt.state[p]["m"].double(), st["m"]
            ulp = 2.0 ** (torch.floor(torch.log2(torch.maximum(m.abs(), r.abs()).clamp_min(1e-30))) - 7)
            assert ((m - r).abs() <= 8 * ulp * 1.01).all() and float((m != r).double().mean()) <= 5e-3
    for shape, p, r in zip(SHAPES, params, ref):
        rel = float((p.detach().double() - r).norm() / r.norm())
        assert rel <= tol, (shape, rel)
    assert factored_dims((64, 48), 32) == (0, 1) and factored_dims((40, 16), 32) is None
    assert factored_dims((3, 48, 40), 32) == (1, 2) and factored_dims((32, 32), 32) == (1, 0)
    state = opt.state[params[0]]
    assert state["row"].shape == (48,) and state["col"].shape == (64,) and state["m"].dtype == opt.momentum_dtype
    assert "v" in opt.state[params[1]] and opt.state[params[1]]["v"].shape == (40, 16)


def test_state_bytes_per_parameter() -> None:
    """About 2 bytes per parameter of a large matrix (bf16 momentum + row/col statistics)."""
    p = torch.nn.Parameter(torch.zeros(1024, 4096))
    opt = Factored([p])
    p.grad = torch.ones_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values())
    assert 2.0 <= nbytes / p.numel() < 2.01


LAYOUTS_2 = [["parallel.zero=1"], ["parallel.zero=3"], ["parallel.tp=2"]]
# ViT-G's recipe values (lr 8e-4, absolute weight decay 0.03 x lr)
FACTORED = ["optim.name=factored", "optim.lr=0.0008", "optim.weight_decay=0.000024"]
# Parameters are compared relative to their norm: the factored optimizer adds its epsilon (1e-30) to
# g^2 inside the square root, so gradient components at rounding-noise level (which differ between
# layouts by the order of summation) still get updates of full size. Relative to how far training
# moved the parameters the difference is ~1e-4 (AdamW, whose 1e-8 outside the root damps them: ~2e-6).
PARAM_RTOL = 1e-5


def _parity(tmp_path: Path, digits_dir: str, nproc: int, layouts: list[list[str]], extra: list[str],
            optim: list[str] = FACTORED) -> dict:
    """20 steps in one process, then under each layout; the parity tool's comparison per layout."""
    overrides = [f"data.dir={digits_dir}", "model.dropout=0", "train.steps=20", "schedule.cooldown_steps=2",
                 "checkpoint.every_steps=0", "train.micro_batch_size=0", "parallel.timeout_s=120", *optim,
                 "eval.every_steps=0", *extra]
    return parity(TEST_CONFIG, overrides, layouts, tmp_path, nproc, timeout=900)[0]


def _check(results: dict, n: int) -> None:
    assert len(results) == n
    for name, r in results.items():
        print(name, {k: r[k] for k in ("max_loss_rel_diff", "param_rel_diff", "param_update_rel_diff")})
    for name, r in results.items():
        assert r["steps"] == 20 and r["same_keys"], name
        assert r["param_rel_diff"] <= PARAM_RTOL, (name, r)
        assert r["max_loss_rel_diff"] <= 1e-5, (name, r)


def test_sharded_equals_one_process_two_ranks(digits_dir: str, tmp_path: Path) -> None:
    """dp2 ZeRO-1, dp2 ZeRO-3 (the head's 11 rows split unevenly, 6 + 5), tp2."""
    _check(_parity(tmp_path, digits_dir, 2, LAYOUTS_2, ["model.num_classes=11"]), len(LAYOUTS_2))


def test_sharded_equals_one_process_uneven_fsdp_rows(digits_dir: str, tmp_path: Path) -> None:
    """A factored matrix whose first dim (65) does not split evenly under FSDP (33 + 32 rows)."""
    _check(_parity(tmp_path, digits_dir, 2, [["parallel.zero=3"]], ["model.mlp_dim=65"]), 1)


@pytest.mark.slow
def test_sharded_equals_one_process_dp2_tp2(digits_dir: str, tmp_path: Path) -> None:
    layouts = [["parallel.dp=2", "parallel.tp=2", "parallel.zero=3"], ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]]
    _check(_parity(tmp_path, digits_dir, 4, layouts, []), len(layouts))


def test_elastic_resume_from_dp2_zero3(digits_dir: str, tmp_path: Path) -> None:
    """Save under dp2 ZeRO-3 (row/col statistics and momentum as DTensor shards), resume in one process
    and under tp2: the continued run matches the uninterrupted one within the elastic tolerances."""
    from test_resume import ELASTIC, check_elastic_continuation, torchrun

    factored = FACTORED
    ref_run = tmp_path / "dp2-zero3"
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={ref_run}", *ELASTIC, *factored, "parallel.zero=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = ref_run / "checkpoints" / "step_00000004"
    for nproc, layout in ((1, []), (2, ["parallel.tp=2"])):
        run = tmp_path / f"resumed-{nproc}"
        args = [f"data.dir={digits_dir}", f"run.dir={run}", *ELASTIC, *factored, *layout, f"resume={ckpt}"]
        proc = torchrun(nproc, *args)
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_elastic_continuation(ref_run, run, layout, PARAM_RTOL)


def test_vit_g14_recipe_config() -> None:
    """The shipped ViT-G/14 recipe resolves to the paper's model and big_vision's optimizer settings."""
    from bigtrain.config import load_config
    from bigtrain.config.schema import parse_wd_mults
    from bigtrain.families import RunSpec
    from bigtrain.recipes import build_model, num_params
    from bigtrain.tasks import ClassificationTask

    cfg = load_config(ROOT / "configs" / "vit" / "vit_g14.yaml")
    assert (cfg.model.width, cfg.model.depth, cfg.model.mlp_dim, cfg.model.num_heads) == (1664, 48, 8192, 16)
    assert cfg.optim.name == "factored" and cfg.optim.weight_decay == pytest.approx(0.03 * cfg.optim.lr)
    with torch.device("meta"):
        model = build_model(RunSpec.of(cfg))
    assert round(model.num_params(trunk_only=True) / 1e9, 3) == 1.843 and round(num_params(model) / 1e9, 3) == 1.917
    rules = parse_wd_mults(cfg.optim.wd_mults)
    mult = {n: next((m for rx, m in rules if rx.fullmatch(n)), 0.0) for n, _ in model.named_parameters()}
    assert mult["head.weight"] == 100 and mult["blocks.0.attn.q.weight"] == mult["pool.mlp.fc2.weight"] == 1
    assert mult["patch_embed.weight"] == 1
    assert mult["blocks.0.norm1.weight"] == mult["head.bias"] == mult["pos_embed"] == mult["pool.probe"] == 0
    task = ClassificationTask(torch.nn.Identity(), loss="sigmoid")
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 1, 4])
    expected = -(torch.nn.functional.one_hot(labels, 5) * torch.nn.functional.logsigmoid(logits)
                 + (1 - torch.nn.functional.one_hot(labels, 5)) * torch.nn.functional.logsigmoid(-logits)).sum(-1).mean()
    assert float(task.loss(logits, {"label": labels})["loss"]) == pytest.approx(float(expected), rel=1e-6)
    small = load_config(None, ["model.variant=debug", "model.head_bias_init=-10", "task=sigmoid_classification"])
    assert torch.all(build_model(RunSpec.of(small)).head.bias == -10.0)


def test_a_resumed_step_counter_stays_on_the_host() -> None:
    """After load_state_dict the state moves to the parameter's device, but ``step`` (read as a Python
    number once per parameter per step) stays a host tensor: no device sync per parameter on CUDA.
    A parameter on the ``meta`` device stands in for the GPU here."""
    from bigtrain.optim.adamw8bit import AdamW8bit

    for make in (lambda ps: Factored([{"params": ps, "lr": 0.01, "base_lr": 0.01}]), lambda ps: AdamW8bit(ps, lr=0.01)):
        p = torch.nn.Parameter(torch.randn(64, 48))
        opt = make([p])
        p.grad = torch.randn(64, 48)
        opt.step()
        q = torch.nn.Parameter(torch.empty(64, 48, device="meta"))
        again = make([q])
        again.load_state_dict(opt.state_dict())
        state = again.state[q]
        assert state["step"].device.type == "cpu" and float(state["step"]) == 1
        assert all(v.device.type == "meta" for k, v in state.items() if torch.is_tensor(v) and k != "step")
