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
        # loss * tokens, correct tokens, tokens: summed on the device (no host read per batch); samples and
        # samples lost: host counts from the loader
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        samples = lost = 0
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
                n = batch["weight"].sum().double() * self.seq_len
                sums += torch.stack([out["loss"].double() * n, out["token_acc"].double() * n, n])
                samples, lost = samples + batch["num_samples"], lost + batch["num_errors"]
        finally:
            model.train(was_training)
        totals = torch.cat([sums, torch.tensor([samples, lost], dtype=torch.float64, device=self.device)])
        if self.dp_size > 1:
            dist.all_reduce(totals, group=self.dp_group)  # on the device: NCCL reduces device tensors only
        totals = totals.cpu()  # the one host read of the evaluation
        loss = float(totals[0] / totals[2])
        warn_lost(self.split, int(totals[3]), int(totals[4]))
        return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0)), "eval/token_acc": float(totals[1] / totals[2]),
                "eval/tokens": int(totals[2]), "eval/num_samples": int(totals[3]), "eval/samples_lost": int(totals[4])}
