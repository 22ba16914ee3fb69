"""Minitron width/depth pruning of a causal LM (Llama/Mistral/Qwen2 shape), on the full model.

Importance (Minitron, "Compact Language Models via Pruning and Knowledge Distillation", and
NVIDIA Model-Optimizer's implementation of it), from forward passes over calibration batches,
each activation aggregated as mean of |.| over the sequence, then L2 over the batch:

* attention heads: the per-head context (the input of ``o_proj``), L2 over the head dimension;
* MLP neurons: the input of ``down_proj`` (silu(gate) * up);
* embedding channels: the outputs of every layer's two norms, summed over layers;
* layers: block importance 1 - cos(block input, block output), averaged over tokens.

Slicing keeps gate/up rows paired with down columns, keeps an equal number of query heads in
every key/value group (the KV heads themselves are never pruned), slices every tensor touching
the residual stream for channels, writes ``head_dim`` explicitly (the width no longer equals
heads x head_dim) and renumbers kept layers. Keeping everything in order reproduces the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from bigtrain.models.causal_lm import CausalLM


@dataclass
class Importance:
    heads: torch.Tensor  # [layers, query heads]
    neurons: torch.Tensor  # [layers, mlp_dim]
    channels: torch.Tensor  # [width]
    layers: torch.Tensor  # [layers], 1 - cos(in, out), or the loss increase without the layer
    samples: int = 0
    layer_metric: str = "cosine"

    def to_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.tolist(), "neurons": self.neurons.tolist(), "channels": self.channels.tolist(),
                "layers": self.layers.tolist(), "samples": self.samples, "layer_metric": self.layer_metric}


@dataclass
class _Accumulator:
    sq: dict[str, torch.Tensor] = field(default_factory=dict)  # sum over samples of (mean_seq |a|)^2

    def add(self, key: str, act: torch.Tensor) -> None:
        """act: [batch, seq, ...]: mean |.| over the sequence, squares summed over the batch."""
        per_sample = act.detach().float().abs().mean(dim=1)
        contrib = per_sample.pow(2).sum(dim=0)
        self.sq[key] = self.sq[key] + contrib if key in self.sq else contrib

    def l2(self, key: str) -> torch.Tensor:
        return self.sq[key].sqrt()


@torch.no_grad()
def estimate_importance(model: CausalLM, batches: Iterable[torch.Tensor]) -> Importance:
    """Forward ``batches`` (token ids [B, S]) through the unsharded model with hooks."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    acc, cos_sum, tokens, samples = _Accumulator(), torch.zeros(len(model.layers)), 0, 0
    hooks = []
    for i, (name, layer) in enumerate(sorted(model.layers.items(), key=lambda kv: int(kv[0]))):
        def context(mod: nn.Module, args: tuple, i: int = i) -> None:
            x = args[0]
            acc.add(f"heads{i}", x.reshape(*x.shape[:2], -1, head_dim).norm(dim=-1))

        def neurons(mod: nn.Module, args: tuple, i: int = i) -> None:
            acc.add(f"neurons{i}", args[0])

        def norm_out(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            acc.add("channels", out)

        def block(mod: nn.Module, args: tuple, kwargs: dict, out: object, i: int = i) -> None:
            x_in = args[0] if args else kwargs["hidden_states"]
            x_out = out[0] if isinstance(out, tuple) else out
            cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)  # [B, S]
            cos_sum[i] += (1 - cos).sum()

        hooks += [layer.self_attn.o_proj.register_forward_pre_hook(context),
                  layer.mlp.down_proj.register_forward_pre_hook(neurons),
                  layer.input_layernorm.register_forward_hook(norm_out),
                  layer.post_attention_layernorm.register_forward_hook(norm_out),
                  layer.register_forward_hook(block, with_kwargs=True)]
    try:
        for x in batches:
            model(x)
            tokens += x.numel()
            samples += x.shape[0]
    finally:
        for h in hooks:
            h.remove()
    n = len(model.layers)
    return Importance(heads=torch.stack([acc.l2(f"heads{i}") for i in range(n)]),
                      neurons=torch.stack([acc.l2(f"neurons{i}") for i in range(n)]),
                      channels=acc.l2("channels"), layers=cos_sum / max(tokens, 1), samples=samples)


def top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the k highest scores, in ascending index order (slices keep the original order)."""
    return sorted(torch.topk(scores, k).indices.tolist())


def keep_heads(scores: torch.Tensor, num_heads: int, num_kv_heads: int) -> list[int]:
    """``num_heads`` query heads of one layer, the same number from every KV group (GQA: query
    heads i*g .. (i+1)*g-1 share KV head i), the highest-scoring within each group."""
    if num_heads % num_kv_heads:
        raise ValueError(f"--heads {num_heads} must be a multiple of the {num_kv_heads} key/value heads")
    group = scores.numel() // num_kv_heads
    per = num_heads // num_kv_heads
    return [g * group + j for g in range(num_kv_heads) for j in top(scores[g * group:(g + 1) * group], per)]


@torch.no_grad()
def lm_loss(model: CausalLM, batches: Iterable[torch.Tensor]) -> float:
    """Mean next-token cross-entropy (nats) per token over the batches (calibration or held-out)."""
    total = count = 0.0
    for tokens in batches:
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="sum")
        total, count = total + float(loss), count + tokens[:, 1:].numel()
    return total / count


@torch.no_grad()
def layer_loss_importance(model: CausalLM, batches: list[torch.Tensor]) -> torch.Tensor:
    """Minitron's other depth metric: how much the calibration loss rises when one layer alone is
    skipped (the residual stream passes it unchanged). One pass per layer, no copies: the layer
    container is swapped for one without that layer and restored."""
    layers = model.layers
    base = lm_loss(model, batches)
    scores = []
    try:
        for name in layers:
            model.layers = nn.ModuleDict({k: v for k, v in layers.items() if k != name})
            scores.append(lm_loss(model, batches) - base)
    finally:
        model.layers = layers
    return torch.tensor(scores)


@dataclass
class Plan:
    """What to keep: query heads and MLP neurons per kept layer (indexed by original layer),
    residual channels, and the original indices of the kept layers."""

    layers: list[int]
    heads: dict[int, list[int]]
    neurons: dict[int, list[int]]
    channels: list[int]


def make_plan(imp: Importance, config: Any, hidden: int, ffn: int, heads: int, layers: int) -> Plan:
    c = config
    keep_layers = sorted(torch.topk(imp.layers, layers).indices.tolist())  # least important blocks dropped
    return Plan(layers=keep_layers,
                heads={i: keep_heads(imp.heads[i], heads, c.num_key_value_heads) for i in keep_layers},
                neurons={i: top(imp.neurons[i], ffn) for i in keep_layers},
                channels=top(imp.channels, hidden))


@torch.no_grad()
def apply_plan(model: CausalLM, plan: Plan) -> CausalLM:
    """A new, smaller CausalLM holding the kept slices (the input model is left unchanged)."""
    import copy

    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    ch = torch.tensor(plan.channels)
    n_heads = len(next(iter(plan.heads.values())))
    ffn = len(next(iter(plan.neurons.values())))
    new_cfg = copy.deepcopy(c)
    new_cfg.hidden_size, new_cfg.intermediate_size = len(plan.channels), ffn
    new_cfg.num_attention_heads, new_cfg.num_hidden_layers = n_heads, len(plan.layers)
    new_cfg.head_dim = head_dim  # no longer width / heads: written explicitly (transformers reads it)
    if getattr(new_cfg, "layer_types", None):
        new_cfg.layer_types = [c.layer_types[i] for i in plan.layers]
    with torch.device("meta"):
        small = CausalLM(new_cfg)
    state: dict[str, torch.Tensor] = {}
    big = model.state_dict()

    def rows(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.index_select(0, idx)

    def cols(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return t.index_select(1, idx)

    state["embed_tokens.weight"] = cols(big["embed_tokens.weight"], ch)
    state["norm.weight"] = big["norm.weight"][ch]
    if not getattr(c, "tie_word_embeddings", False):
        state["lm_head.weight"] = cols(big["lm_head.weight"], ch)
    for new, old in enumerate(plan.layers):
        p = f"layers.{old}."
        q = torch.tensor([h * head_dim + d for h in plan.heads[old] for d in range(head_dim)])
        f = torch.tensor(plan.neurons[old])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            state[f"layers.{new}.{name}"] = big[p + name][ch]
        state[f"layers.{new}.self_attn.q_proj.weight"] = cols(rows(big[p + "self_attn.q_proj.weight"], q), ch)
        for kv in ("k_proj", "v_proj"):
            state[f"layers.{new}.self_attn.{kv}.weight"] = cols(big[p + f"self_attn.{kv}.weight"], ch)
            if p + f"self_attn.{kv}.bias" in big:
                state[f"layers.{new}.self_attn.{kv}.bias"] = big[p + f"self_attn.{kv}.bias"]
        if p + "self_attn.q_proj.bias" in big:
            state[f"layers.{new}.self_attn.q_proj.bias"] = big[p + "self_attn.q_proj.bias"][q]
        state[f"layers.{new}.self_attn.o_proj.weight"] = rows(cols(big[p + "self_attn.o_proj.weight"], q), ch)
        for gu in ("gate_proj", "up_proj"):  # the same neurons for both halves of SwiGLU
            state[f"layers.{new}.mlp.{gu}.weight"] = cols(rows(big[p + f"mlp.{gu}.weight"], f), ch)
        state[f"layers.{new}.mlp.down_proj.weight"] = rows(cols(big[p + "mlp.down_proj.weight"], f), ch)
        # Llama's attention_bias / mlp_bias: each bias follows its layer's output rows (residual
        # channels for the projections back into the stream, kept neurons for gate/up)
        for name, idx in (("self_attn.o_proj.bias", ch), ("mlp.gate_proj.bias", f), ("mlp.up_proj.bias", f),
                          ("mlp.down_proj.bias", ch)):
            if p + name in big:
                state[f"layers.{new}.{name}"] = big[p + name][idx]
    small.load_state_dict({k: v.clone() for k, v in state.items()}, strict=False, assign=True)
    small.retie()
    small.reset_buffers(torch.device("cpu"))
    for i, layer in enumerate(small.layers.values()):
        layer.self_attn.layer_idx = i  # the KV-cache slot follows the new numbering
    missing = [n for n, t in small.named_parameters() if t.is_meta]
    if missing:
        raise RuntimeError(f"pruned model left parameters unset: {missing[:5]}")
    return small
