"""A training step reads device values into Python once (the step's reduced vector), not per
micro-batch: counted by intercepting every tensor-to-Python conversion made by bigtrain's code."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

import bigtrain

PACKAGE = str(Path(bigtrain.__file__).resolve().parent)
PLUMBING = tuple(str(Path(torch.__file__).resolve().parent / f) for f in ("_tensor.py", "overrides.py"))
READS = {"item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy"}


class CountReads(TorchFunctionMode):
    """Tensor-to-Python reads made directly by a file of the bigtrain package (not those inside
    torch, e.g. the optimizer's host-side step counters)."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in READS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename in PLUMBING:
                frame = frame.f_back
            if frame is not None and frame.f_code.co_filename.startswith(PACKAGE):
                self.sites.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {func.__name__}")
        return func(*args, **(kwargs or {}))


def test_one_host_read_per_step_with_gradient_accumulation(tiny_cfg) -> None:
    from bigtrain.recipes import build_trainer

    # 4 micro-batches per step: a per-micro-batch read would show up 4 times
    trainer = build_trainer(tiny_cfg("train.micro_batch_size=8", "model.dropout=0"))
    trainer.train_step()  # first step: lazy initialisation is not what is counted
    counter = CountReads()
    with counter:
        logs = [trainer.train_step() for _ in range(3)]
    assert all(isinstance(v, float) for r in logs for v in r.values())
    assert len(counter.sites) == 3, counter.sites
    assert all(site.startswith("trainer.py") and site.endswith("tolist") for site in counter.sites), counter.sites
