"""8-bit AdamW: codes equal an independent blockwise quantizer, the update stays close to fp32 AdamW,
2.03 bytes per quantized parameter, sharded runs equal one process, and a dp2 ZeRO-3 checkpoint
resumes at dp4 and in one process."""

from __future__ import annotations

import pytest
import torch

from bigtrain.optim.adamw8bit import QUANTIZED, AdamW8bit, dynamic_map, is_quantized
from test_factored import _parity

SHAPES = [(64, 96), (40, 300), (3, 48, 40), (50,), (10, 10), (8, 700)]


def reference_codes(x: torch.Tensor, signed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise quantization written from its definition: blocks of 256 along the last dim, each
    scaled by its absmax, every element mapped to the nearest map value (fp64)."""
    qmap = dynamic_map(signed).double()
    x = x.double()
    nblocks = -(-x.shape[-1] // 256)
    absmax = torch.stack([x[..., b * 256 : (b + 1) * 256].abs().amax(-1) for b in range(nblocks)], dim=-1)
    scale = absmax.repeat_interleave(256, dim=-1)[..., : x.shape[-1]]
    normalized = x / torch.where(scale > 0, scale, torch.ones_like(scale))
    codes = (normalized.unsqueeze(-1) - qmap).abs().argmin(-1)
    return codes.to(torch.uint8), absmax.float()


def test_dynamic_maps() -> None:
    signed, unsigned = dynamic_map(True), dynamic_map(False)
    assert signed.numel() == unsigned.numel() == 256
    assert bool((signed[1:] > signed[:-1]).all()) and bool((unsigned[1:] > unsigned[:-1]).all())
    assert float(signed.max()) == float(unsigned.max()) == 1.0 and float(unsigned.min()) == 0.0
    assert int((signed > 0).sum()) == 128 and int((signed < 0).sum()) == 127
    assert 1e-7 < float(unsigned[1]) < 1e-6  # seven decades below the absmax


def test_state_codes_and_update_against_references() -> None:
    """After every step the stored codes and absmax equal the reference quantizer applied to the fp32
    moments of that step (recomputed from the previous dequantized state); parameters stay within
    0.5% (relative) of fp32 AdamW after 30 steps; small and 1-D tensors keep exact fp32 AdamW state."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = AdamW8bit(params, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for _ in range(30):
        prev = {}
        for p in params:
            st = opt.state[p]
            if "m_codes" in st:
                m = dynamic_map(True)[st["m_codes"].long()] * st["m_absmax"].repeat_interleave(256, -1)[..., : p.shape[-1]]
                v = dynamic_map(False)[st["v_codes"].long()] * st["v_absmax"].repeat_interleave(256, -1)[..., : p.shape[-1]]
                prev[p] = (m, v)
        for p, q in zip(params, ref):
            g = torch.randn(p.shape, generator=gen)
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
        for p in params:
            if p in prev:
                m = prev[p][0] * 0.9 + 0.1 * p.grad
                v = prev[p][1] * 0.999 + 0.001 * p.grad * p.grad
                for name, x, signed in (("m", m, True), ("v", v, False)):
                    codes, absmax = reference_codes(x, signed)
                    torch.testing.assert_close(opt.state[p][f"{name}_absmax"], absmax, rtol=1e-6, atol=0)
                    # fp32 vs fp64 normalization may round a value sitting on a midpoint the other way
                    assert float((opt.state[p][f"{name}_codes"] != codes).float().mean()) < 1e-3
    for shape, p, q in zip(SHAPES, params, ref):
        rel = float((p.detach() - q.detach()).norm() / q.detach().norm())
        assert rel < (5e-3 if is_quantized(shape) else 1e-6), (shape, rel)
        st = opt.state[p]
        assert ("m_codes" in st) == is_quantized(shape) == (len(shape) >= 2 and p.numel() >= 4096)
        if "m_codes" in st:
            assert st["m_codes"].dtype == torch.uint8 and st["m_absmax"].shape == (*shape[:-1], -(-shape[-1] // 256))


def test_state_bytes_per_parameter() -> None:
    p = torch.nn.Parameter(torch.zeros(1024, 4096))
    opt = AdamW8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for k, t in opt.state[p].items() if k != "step")
    assert nbytes / p.numel() == pytest.approx(2 + 8 / 256)


def _sharded_worker(rank: int, world: int, port: int, out: str) -> None:
    """Each placement's DTensor run gets the very gradients the single-process run gets."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    mesh = init_device_mesh("cpu", (world,))
    # (shape, shard dim): uneven rows; columns 300 = 150 + 150, so block 0 (columns 0-255) straddles the
    # ranks; a 3-D tensor split on its middle dim; one split on the last dim of a 3-D tensor
    cases = [((65, 300), 0), ((64, 300), 1), ((5, 40, 300), 1), ((4, 30, 520), 2)]
    gen = torch.Generator().manual_seed(1)
    results = {}
    for shape, dim in cases:
        full = torch.randn(shape, generator=gen)
        grads = [torch.randn(shape, generator=gen) * torch.rand(shape[-1], generator=gen) for _ in range(5)]
        plain = torch.nn.Parameter(full.clone())
        sharded = torch.nn.Parameter(distribute_tensor(full.clone(), mesh, [Shard(dim)]))
        opts = [AdamW8bit([plain], lr=1e-2, weight_decay=0.1), AdamW8bit([sharded], lr=1e-2, weight_decay=0.1)]
        for g in grads:
            plain.grad = g.clone()
            sharded.grad = distribute_tensor(g.clone(), mesh, [Shard(dim)])
            for o in opts:
                o.step()
        st_plain, st_sharded = opts[0].state[plain], opts[1].state[sharded]
        results[str(shape)] = {
            "param": float((sharded.full_tensor() - plain).abs().max()),
            **{k: float((st_sharded[k].full_tensor().float() - st_plain[k].float()).abs().max()) for k in QUANTIZED},
        }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def test_sharded_state_equals_one_process_bitwise(tmp_path) -> None:
    """The sharding machinery alone (identical gradients): FSDP-style uneven dim-0 shards, a block that
    straddles ranks (MAX all-reduce) and 3-D shards give the single process's parameters, codes and
    block absmax exactly."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "results.pt"
    mp.spawn(_sharded_worker, args=(2, port, str(out)), nprocs=2, join=True)
    results = torch.load(out)
    assert len(results) == 4
    for shape, diffs in results.items():
        assert all(d == 0.0 for d in diffs.values()), (shape, diffs)


# width 64: the attention and MLP matrices are quantized (>= 4096 elements). mlp_dim 129: fc1's 129 rows
# split unevenly under FSDP (65 + 64). mlp_dim 130 under tp2: the rowwise fc2 splits its 130 columns —
# one block of the global grid — 65 + 65 across the ranks, so the block absmax needs the MAX all-reduce
EIGHT_BIT = ["optim.name=adamw8bit", "model.width=64", "model.mlp_dim=129", "model.num_classes=11"]
EIGHT_BIT_TP = [*EIGHT_BIT[:2], "model.mlp_dim=130"]
# Training under a layout changes the order of gradient sums, so gradients differ by rounding noise
# (~1e-7 of their norm). fp32 AdamW carries that through 20 steps as 3.4e-7 of the parameters' norm
# (dp2 ZeRO-1, this model). With 8-bit moments the same noise moves a moment across a code's rounding
# boundary now and then, and elements whose v sits below the map's smallest step (v/absmax < 1.6e-7:
# near-zero gradients) get updates of m/sqrt(v) from coarse codes: measured 0.96-1.1e-4 over 20 steps.
# That is the quantization's sensitivity, not the sharding's: with identical gradients the sharded
# state is bitwise the single process's (test above)
PARAM_RTOL = 5e-4


def _check(results: dict, n: int) -> None:
    assert len(results) == n
    for name, r in results.items():
        print(name, {k: r[k] for k in ("max_loss_rel_diff", "param_rel_diff", "param_update_rel_diff")})
    for name, r in results.items():
        assert r["steps"] == 20 and r["same_keys"], name
        assert r["param_rel_diff"] <= PARAM_RTOL, (name, r)
        assert r["max_loss_rel_diff"] <= 5e-5, (name, r)


def test_sharded_equals_one_process(digits_dir: str, tmp_path) -> None:
    layouts = [["parallel.zero=1"], ["parallel.zero=3"]]
    _check(_parity(tmp_path / "dp", digits_dir, 2, layouts, EIGHT_BIT, optim=[]), len(layouts))
    _check(_parity(tmp_path / "tp", digits_dir, 2, [["parallel.tp=2"]], EIGHT_BIT_TP, optim=[]), 1)


@pytest.mark.slow
def test_sharded_equals_one_process_dp2_tp2(digits_dir: str, tmp_path) -> None:
    layouts = [["parallel.dp=2", "parallel.tp=2", "parallel.zero=3"], ["parallel.dp=2", "parallel.tp=2", "parallel.zero=1"]]
    _check(_parity(tmp_path, digits_dir, 4, layouts, EIGHT_BIT_TP, optim=[]), len(layouts))


@pytest.mark.slow  # CI time; the factored optimizer's elastic resume (same machinery) runs by default
def test_elastic_resume_from_dp2_zero3(digits_dir: str, tmp_path) -> None:
    """Save under dp2 ZeRO-3 (codes and absmax as DTensor shards), resume at dp4 ZeRO-3 and in one
    process: the continued run matches the uninterrupted one within the elastic tolerances."""
    from test_resume import ELASTIC, check_elastic_continuation, torchrun

    ref_run = tmp_path / "dp2-zero3"
    proc = torchrun(2, f"data.dir={digits_dir}", f"run.dir={ref_run}", *ELASTIC, *EIGHT_BIT, "parallel.zero=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = ref_run / "checkpoints" / "step_00000004"
    for nproc, layout in ((1, []), (4, ["parallel.zero=3"])):
        run = tmp_path / f"resumed-{nproc}"
        proc = torchrun(nproc, f"data.dir={digits_dir}", f"run.dir={run}", *ELASTIC, *EIGHT_BIT, *layout, f"resume={ckpt}")
        assert proc.returncode == 0, proc.stderr[-3000:]
        check_elastic_continuation(ref_run, run, layout, PARAM_RTOL)


@pytest.mark.parametrize("optim", [["optim.name=factored", "optim.lr=0.0008", "optim.weight_decay=0.000024"], EIGHT_BIT])
def test_same_layout_resume_is_bit_exact(optim: list[str], digits_dir: str, tmp_path) -> None:
    """Resumed from step 4, steps 5-8 and the final parameters are bit-identical to the uninterrupted run,
    and the state keeps its saved dtypes (torch's load_state_dict would cast the bf16 momentum to fp32)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from test_resume import model_params, torchrun, train_records

    common = [f"data.dir={digits_dir}", "train.steps=8", "checkpoint.every_steps=4", "schedule.cooldown_steps=2", *optim]
    ref_run, run = tmp_path / "ref", tmp_path / "resumed"
    proc = torchrun(1, *common, f"run.dir={ref_run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = torchrun(1, *common, f"run.dir={run}", f"resume={ref_run / 'checkpoints' / 'step_00000004'}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref, got = train_records(ref_run), train_records(run)
    assert [got[s]["loss"] for s in range(5, 9)] == [ref[s]["loss"] for s in range(5, 9)]
    a, b = model_params(run / "checkpoints" / "step_00000008"), model_params(ref_run / "checkpoints" / "step_00000008")
    assert all(torch.equal(a[k], b[k]) for k in b)
    dcp_to_torch_save(str(run / "checkpoints" / "step_00000008"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt", weights_only=True)
    dtypes = {str(v.dtype) for k, v in _flatten(state).items() if k.rsplit(".", 1)[-1] in ("m", "m_codes", "m_absmax")}
    assert dtypes == ({"torch.bfloat16"} if "optim.name=factored" in optim else {"torch.uint8", "torch.float32"}), dtypes


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif torch.is_tensor(v):
            out[f"{prefix}{k}"] = v
    return out
