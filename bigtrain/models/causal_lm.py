"""Decoder-only causal LM built from a Hugging Face ``LlamaForCausalLM``, re-housed for parallelism.

The HF modules (embedding, decoder layers, norm, rotary embedding, LM head) are
used as they are; only the container changes: layers live in a ``ModuleDict``
keyed "0", "1", ... so pipeline stages can drop layers and checkpoint keys stay
stable. ``to_hf`` puts the (trained or pruned) modules back into an HF model
for ``save_pretrained``. Tiny models are built from a local ``LlamaConfig``:
no hub access.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def llama_config(vocab_size: int, width: int, depth: int, num_heads: int, num_kv_heads: int, mlp_dim: int, seq_len: int) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=mlp_dim, num_hidden_layers=depth,
        num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=seq_len, tie_word_embeddings=False, attn_implementation="sdpa",
        rms_norm_eps=1e-6,
    )


class CausalLM(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(config)
        self.config = config
        self.embed_tokens: nn.Module | None = hf.model.embed_tokens
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(hf.model.layers)})
        self.norm: nn.Module | None = hf.model.norm
        self.lm_head: nn.Module | None = hf.lm_head
        self.rotary_emb = hf.model.rotary_emb
        # Tokens between layers may be split along the sequence by a parallelizer
        # (sequence parallelism); rotary embeddings need the full length.
        self.sequence_shards = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids -> logits; a pipeline stage takes/returns hidden states where it lacks ends."""
        h = self.embed_tokens(x) if self.embed_tokens is not None else x
        seq = h.shape[1] * (self.sequence_shards if self.embed_tokens is None else 1)
        positions = torch.arange(seq, device=h.device)[None]
        position_embeddings = self.rotary_emb(h, positions)
        for layer in self.layers.values():
            h = layer(h, position_embeddings=position_embeddings)
        if self.norm is None:
            return h
        return self.lm_head(self.norm(h))

    def prune_for_stage(self, keep_blocks: list[str], first: bool, last: bool) -> None:
        for name in list(self.layers.keys()):
            if name not in keep_blocks:
                del self.layers[name]
        if not first:
            self.embed_tokens = None
        if not last:
            self.norm = None
            self.lm_head = None

    @property
    def blocks(self) -> nn.ModuleDict:
        """The block container under the name the distributed layer uses for every model."""
        return self.layers

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def train_flops_per_token(self, seq_len: int) -> float:
        c = self.config
        head_dim = c.hidden_size // c.num_attention_heads
        kv = c.num_key_value_heads * head_dim
        per_layer = 2 * (2 * c.hidden_size * c.hidden_size + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size)
        per_layer += 2 * 2 * seq_len * c.hidden_size  # attention scores and values (causal: ~half used, counted whole)
        return 3.0 * (c.num_hidden_layers * per_layer + 2 * c.hidden_size * c.vocab_size)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    def head_param_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("lm_head.")}

    def to_hf(self) -> Any:
        """An HF ``LlamaForCausalLM`` holding these (unsharded, unsplit) modules."""
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM(self.config)
        hf.model.embed_tokens = self.embed_tokens
        hf.model.layers = nn.ModuleList([self.layers[k] for k in sorted(self.layers, key=int)])
        hf.model.norm = self.norm
        hf.lm_head = self.lm_head
        return hf
