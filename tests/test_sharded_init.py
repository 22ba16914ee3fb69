"""The meta-device init recorder (bigtrain.distributed.sharded_init), begun for issue 22 item 6:
replayed tensor by tensor on the CPU, the values equal a CPU build from the same seed, bit for bit.
Not yet wired into recipes.build_parallel. Two initialisers do nothing on meta and are recorded
specially: torch 2.13's ``trunc_normal_`` (the ViT's patch embedding) and Hugging Face's
``init_weights`` (Llama, the UNet's CLIP text encoder)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bigtrain.config import load_config
from bigtrain.distributed.sharded_init import InitRecorder, replay
from bigtrain.families import RunSpec
from bigtrain.recipes import build_model
from conftest import ROOT


class _Tied(nn.Module):
    """Tied weights, a temporary random tensor, a computed buffer, partial and chained writes."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.b.weight = nn.Parameter(self.a.weight.t().contiguous() * 0.5 + torch.randn(8, 16))
        self.emb = nn.Embedding(10, 8)
        self.head = nn.Linear(8, 10, bias=False)
        self.head.weight = self.emb.weight
        self.register_buffer("table", torch.arange(12, dtype=torch.float32).view(3, 4).exp(), persistent=False)
        with torch.no_grad():
            self.a.bias[:4].normal_()
            self.emb.weight.uniform_(-1, 1).mul_(0.1).add_(self.a.bias[0])


def _tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False))


def _replayed(build, seed: int) -> tuple[dict[str, torch.Tensor], int]:
    with torch.device("meta"), InitRecorder() as rec:
        meta = build()
    got: dict[str, torch.Tensor] = {}
    sinks: dict = {}
    for name, t in _tensors(meta):
        ref = rec.record.ref(t)
        sinks.setdefault(ref.sid, []).append((ref, lambda full, name=name: got.__setitem__(name, full.clone())))
    torch.manual_seed(seed)
    replay(rec.record, sinks)
    return got, len(rec.record.ops)


def _check(build, seed: int) -> None:
    torch.manual_seed(seed)
    ref = dict(_tensors(build()))
    got, n_ops = _replayed(build, seed)
    assert n_ops > 0 and set(got) == set(ref)
    for name, t in ref.items():
        assert torch.equal(got[name], t), name


def test_replayed_init_equals_the_cpu_build_bitwise() -> None:
    _check(_Tied, seed=3)


@pytest.mark.parametrize("config", ["diffusion/dit_digits.yaml", "vit/digits_test.yaml", "llm/stdlib_test.yaml",
                                    "diffusion/unet_digits.yaml"])
def test_replayed_family_init_equals_the_cpu_build_bitwise(config: str) -> None:
    cfg = load_config(ROOT / "configs" / config, [])
    _check(lambda: build_model(RunSpec.of(cfg)), seed=cfg.train.seed)


class _Stack(nn.Module):
    """Hugging Face's order: every parameter created first, all initialised afterwards."""

    def __init__(self, n: int = 6, width: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(n))
        with torch.no_grad():
            for layer in self.layers:
                layer.weight.normal_(0, 0.02)
                layer.bias.zero_()


def test_materialize_fills_an_empty_model_and_holds_one_tensor_in_flight() -> None:
    """record_build + materialize (what build_parallel does per rank, here without a mesh): the
    values of the CPU build; the replay holds at most two layers' storages at once (not the model),
    and leaves the generator where the CPU build leaves it."""
    from bigtrain.distributed.sharded_init import materialize, record_build

    def build() -> nn.Module:
        torch.manual_seed(5)
        return _Stack()

    ref = build()
    after_ref = torch.rand(3)
    built = record_build(build)
    stats = materialize(built, built.model, torch.device("cpu"), seed=5)
    for name, t in ref.state_dict().items():
        assert torch.equal(built.model.state_dict()[name], t), name
    assert torch.equal(torch.rand(3), after_ref)
    layer = 64 * 64 * 4 + 64 * 4
    assert stats["elements"] == sum(p.numel() for p in ref.parameters())
    assert stats["peak_bytes"] <= 2 * layer < 6 * layer, stats


def test_what_cannot_be_recorded_is_refused_by_name() -> None:
    """A tie (to_empty would break it) and CPU random numbers drawn during a meta build raise
    NotRecordable, which build_parallel turns into the whole CPU build."""
    from bigtrain.distributed.sharded_init import NotRecordable, record_build

    with pytest.raises(NotRecordable, match="head.weight"):
        record_build(_Tied)

    class CpuNoise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, device="cpu"))

    with pytest.raises(NotRecordable, match="random"):
        record_build(CpuNoise)


def test_a_tensor_left_uninitialised_on_meta_is_refused() -> None:
    """An initialiser that returns early on meta (as some Hugging Face releases do) would leave
    torch.empty's garbage: refused, so build_parallel builds on the CPU, where it runs."""
    from bigtrain.distributed.sharded_init import NotRecordable, record_build

    class SkipsMeta(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(4, 4))
            if self.w.device.type != "meta":
                nn.init.ones_(self.w)

    with pytest.raises(NotRecordable, match="w is never initialised"):
        record_build(SkipsMeta)
