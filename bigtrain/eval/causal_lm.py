"""Held-out next-token loss, perplexity and token accuracy of a causal LM."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bigtrain.eval.classification import warn_lost
from bigtrain.tasks.causal_lm import CausalLMTask
from bigtrain.tasks.protocol import batch_to_device
from data_pipeline import SplitInfo, sequential_batches
from data_pipeline.loader import TokenBatchDataset
from data_pipeline.tario import DEFAULT_MAX_MEMBER_BYTES


class CausalLMEvaluator:
    best_metric = ("eval/loss", False)

    def __init__(
        self,
        split: SplitInfo,
        seq_len: int,
        vocab_size: int,
        batch_size: int,
        max_samples: int = 0,
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        dp_rank: int = 0,
        dp_size: int = 1,
        dp_group: Any = None,
        max_member_bytes: int = DEFAULT_MAX_MEMBER_BYTES,
        device: torch.device | None = None,
    ) -> None:
        self.device = device or torch.device("cpu")
        self.split, self.seq_len, self.vocab_size, self.batch_size = split, seq_len, vocab_size, batch_size
        self.max_member_bytes = max_member_bytes
        self.max_samples, self.autocast = max_samples, autocast
        self.dp_rank, self.dp_size, self.dp_group = dp_rank, dp_size, dp_group

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> dict[str, float]:
        was_training = model.training
        model.eval()
        task = CausalLMTask(model)
        totals = torch.zeros(5, dtype=torch.float64)  # loss * tokens, correct tokens, tokens, samples, samples lost
        try:
            batches = sequential_batches(
                self.split, None, self.batch_size, self.dp_rank, self.dp_size, self.max_samples,
                make_dataset=lambda split, order: TokenBatchDataset(split, order, self.seq_len, self.vocab_size, 0, "skip",
                                                                    self.max_member_bytes),
                pin_memory=self.device.type == "cuda",
            )
            for batch in batches:
                batch = batch_to_device(batch, self.device)
                with self.autocast():
                    out = task(batch)
                n = float(batch["weight"].sum()) * self.seq_len  # one host sync per eval batch
                totals += torch.tensor([float(out["loss"]) * n, float(out["token_acc"]) * n, n, batch["num_samples"],
                                        batch["num_errors"]], dtype=torch.float64)
        finally:
            model.train(was_training)
        if self.dp_size > 1:
            totals = totals.to(self.device)  # NCCL reduces device tensors only
            dist.all_reduce(totals, group=self.dp_group)
            totals = totals.cpu()
        loss = float(totals[0] / totals[2])
        warn_lost(self.split, int(totals[3]), int(totals[4]))
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/token_acc": float(totals[1] / totals[2]),
                "eval/tokens": int(totals[2]), "eval/num_samples": int(totals[3]), "eval/samples_lost": int(totals[4])}
