"""Decoder-only causal LM built from a Hugging Face decoder of the Llama shape (``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM``), re-housed for parallelism.

The HF modules (embedding, decoder layers, norm, rotary embedding, LM head) are
used as they are; only the container changes: layers live in a ``ModuleDict``
keyed "0", "1", ... so pipeline stages can drop layers and checkpoint keys stay
stable. ``to_hf`` puts the (trained or pruned) modules back into an HF model of
the same architecture for ``save_pretrained``. Models are built from a local
config (a ``LlamaConfig`` from sizes, or a pretrained directory's config.json):
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


# Decoders whose modules have the Llama layout (model.embed_tokens / layers / norm / rotary_emb,
# lm_head; self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj), so one TP plan and one pruner fit.
from bigtrain.models.args import ARCHITECTURES  # noqa: E402 - re-exported


def hf_class(config: Any) -> type:
    import transformers

    arch = (getattr(config, "architectures", None) or ["LlamaForCausalLM"])[0]
    if arch not in ARCHITECTURES:
        raise ValueError(f"architecture {arch} is not supported (supported: {', '.join(ARCHITECTURES)})")
    return getattr(transformers, arch)


class CausalLM(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hf = hf_class(config)(config)
        self.config = config
        self.embed_tokens: nn.Module | None = hf.model.embed_tokens
        self.layers = nn.ModuleDict({str(i): layer for i, layer in enumerate(hf.model.layers)})
        self.norm: nn.Module | None = hf.model.norm
        self.lm_head: nn.Module | None = hf.lm_head
        self.rotary_emb = hf.model.rotary_emb
        self.retie()
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
            out = layer(h, position_embeddings=position_embeddings)
            h = out[0] if isinstance(out, tuple) else out  # transformers < 4.54 returns (hidden_states, ...)
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
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads  # explicit after pruning
        q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
        per_layer = 2 * (2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size)
        per_layer += 2 * 2 * seq_len * q  # attention scores and values (causal: ~half used, counted whole)
        return 3.0 * (c.num_hidden_layers * per_layer + 2 * c.hidden_size * c.vocab_size)

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim < 2}

    def head_param_names(self) -> set[str]:
        return {n for n, _ in self.named_parameters() if n.startswith("lm_head.")}

    def retie(self) -> None:
        """One Parameter under both names when the config ties the embeddings (transformers ties
        lazily, at load time; ``to_empty`` unties them by creating one new tensor per module)."""
        if getattr(self.config, "tie_word_embeddings", False) and self.lm_head is not None \
                and self.embed_tokens is not None:
            self.lm_head.weight = self.embed_tokens.weight

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent buffers (rotary frequencies) after ``to_empty`` left them
        uninitialised: they are derived from the config, never stored in a checkpoint."""
        with torch.device(device):
            self.rotary_emb = type(self.rotary_emb)(config=self.config)

    def to_hf(self) -> Any:
        """An HF model of this architecture holding these (unsharded, unsplit) modules."""
        with torch.device("meta"):  # its own fresh modules are replaced right away
            hf = hf_class(self.config)(self.config)
        hf.model.embed_tokens = self.embed_tokens
        hf.model.layers = nn.ModuleList([self.layers[k] for k in sorted(self.layers, key=int)])
        hf.model.norm = self.norm
        hf.lm_head = self.lm_head
        hf.model.rotary_emb = self.rotary_emb
        if getattr(self.config, "tie_word_embeddings", False):
            hf.lm_head.weight = hf.model.embed_tokens.weight
        return hf
