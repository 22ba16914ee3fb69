"""Vision Transformer, written for one device (parallelism is applied from outside).

Sizes follow "Scaling Vision Transformers" (Zhai et al., 2022, table 2). Heads:
``cls`` (class token), ``gap`` (global average pool) and ``map`` (multihead
attention pooling, the paper's choice, which needs no class token).

Blocks live in ``self.blocks`` (a ``ModuleDict`` keyed "0", "1", ...), so
pipeline stages can drop blocks and checkpoint keys stay the same.
Attention uses separate q/k/v projections and reshapes with ``-1`` heads, so
column-sharding those projections shards heads without touching this code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.args import ViTArgs

class Attention(nn.Module):
    """Multi-head attention; ``kv`` defaults to ``x`` (self-attention)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.head_dim = width // num_heads
        self.q = nn.Linear(width, width)
        # No key bias: q.(k + b) shifts every score of a query by the same q.b, which
        # softmax ignores. Its gradient is exactly zero, so it would only collect
        # rounding noise (amplified by Adam). Dropping it loses nothing (a loaded
        # checkpoint's key bias can be discarded without changing outputs).
        self.k = nn.Linear(width, width, bias=False)
        self.v = nn.Linear(width, width)
        self.proj = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, kv: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if kv is None else kv
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # -1: local head count under tensor parallelism
            return t.view(t.shape[0], t.shape[1], -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(kv)), heads(self.v(kv)))
        return self.drop(self.proj(out.transpose(1, 2).reshape(b, n, -1)))


class MLP(nn.Module):
    def __init__(self, width: int, mlp_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))


class Block(nn.Module):
    """Pre-norm transformer encoder block."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=1e-6)
        self.attn = Attention(width, num_heads, dropout)
        self.norm2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MAPHead(nn.Module):
    """Multihead attention pooling: a learned probe attends over all tokens (big_vision)."""

    def __init__(self, width: int, mlp_dim: int, num_heads: int) -> None:
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, width))
        self.attn = Attention(width, num_heads)
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = MLP(width, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.probe.expand(x.shape[0], -1, -1), kv=x)
        y = y + self.mlp(self.norm(y))
        return y[:, 0]


def sincos2d(grid: int, width: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (1, grid*grid, width)."""
    if width % 4:
        raise ValueError("sincos2d position embedding needs width divisible by 4")
    y, x = torch.meshgrid(torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij")
    omega = 1.0 / (10000 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4 - 1 or 1)))
    y = y.flatten()[:, None] * omega[None]
    x = x.flatten()[:, None] * omega[None]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)[None]


class ViT(nn.Module):
    def __init__(self, args: ViTArgs) -> None:
        super().__init__()
        args.check()
        self.args = args
        w = args.width
        self.patch_embed = nn.Conv2d(args.in_channels, w, kernel_size=args.patch_size, stride=args.patch_size)
        grid = args.image_size // args.patch_size
        if args.posemb == "learned":
            self.pos_embed = nn.Parameter(torch.empty(1, args.num_patches, w))
        else:
            self.register_buffer("pos_embed", sincos2d(grid, w), persistent=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w)) if args.head == "cls" else None
        self.drop = nn.Dropout(args.dropout)
        self.blocks = nn.ModuleDict(
            {str(i): Block(w, args.mlp_dim, args.num_heads, args.dropout) for i in range(args.depth)}
        )
        self.norm = nn.LayerNorm(w, eps=1e-6)
        self.pool = MAPHead(w, args.mlp_dim, args.num_heads) if args.head == "map" else None
        self.head = nn.Linear(w, args.num_classes) if args.num_classes > 0 else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """big_vision-style init: xavier linears, lecun patch embedding, zero head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = self.patch_embed.in_channels * self.patch_embed.kernel_size[0] ** 2
        nn.init.trunc_normal_(self.patch_embed.weight, std=math.sqrt(1.0 / fan_in))
        nn.init.zeros_(self.patch_embed.bias)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.normal_(self.pos_embed, std=1.0 / math.sqrt(self.args.width))
        if self.pool is not None:
            nn.init.xavier_uniform_(self.pool.probe.view(1, -1))
        if self.head is not None and self.args.head_zero_init:
            nn.init.zeros_(self.head.weight)
        if self.head is not None:
            nn.init.constant_(self.head.bias, self.args.head_bias_init)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        # contiguous (batch, token, channel) layout: the transposed view would otherwise
        # propagate its strides through every residual add (and pipeline sends need
        # contiguous tensors)
        x = self.patch_embed(images).flatten(2).transpose(1, 2).contiguous() + self.pos_embed
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.drop(x)

    def pool_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm + pooling: tokens -> pre-logit features."""
        x = self.norm(x)
        if self.args.head == "cls":
            return x[:, 0]
        if self.args.head == "gap":
            return x.mean(dim=1)
        assert self.pool is not None
        return self.pool(x)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pre-logit features (what few-shot probes are fitted on)."""
        return self.forward(images, with_features=True)[1]

    def forward(self, x: torch.Tensor, with_features: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; with ``with_features`` also the pre-logits (one pass, and through
        ``forward`` so that wrappers hooking it, e.g. FSDP, see every call).

        A pipeline stage (see ``prune_for_stage``) takes images only if it kept
        the embedding, otherwise tokens, and returns tokens unless it kept the head.
        """
        if self.patch_embed is not None:
            x = self.embed(x)
        for block in self.blocks.values():
            x = block(x)
        if self.norm is None:
            return x
        feats = self.pool_tokens(x)
        logits = self.head(self.drop(feats)) if self.head is not None else feats
        return (logits, feats) if with_features else logits

    def prune_for_stage(self, keep_blocks: list[str], first: bool, last: bool) -> None:
        """Turn this model into one pipeline stage: keep some blocks, the embedding
        only on the first stage, norm/pooling/classifier only on the last."""
        for name in list(self.blocks.keys()):
            if name not in keep_blocks:
                del self.blocks[name]
        if not first:
            self.patch_embed = None
            self.pos_embed = None
            self.cls_token = None
        if not last:
            self.norm = None
            self.pool = None
            self.head = None

    # --- introspection used by optimizers, logging and benchmarks -----------------
    def num_params(self, trunk_only: bool = False) -> int:
        """Parameter count; ``trunk_only`` excludes pooling head and classifier (the paper's count)."""
        skip = ("pool.", "head.") if trunk_only else ()
        return sum(p.numel() for n, p in self.named_parameters() if not n.startswith(skip))

    def reset_buffers(self, device: torch.device) -> None:
        """Recompute the non-persistent buffers (sincos position embeddings) after ``to_empty`` left them
        uninitialised: they follow from the sizes and are never stored in a checkpoint."""
        if self.args.posemb != "learned":
            grid = self.args.image_size // self.args.patch_size
            self.pos_embed = sincos2d(grid, self.args.width).to(device)

    def no_weight_decay(self) -> set[str]:
        """Parameters exempt from weight decay: norms, biases, embeddings/tokens/probes."""
        names = set()
        for n, p in self.named_parameters():
            if p.ndim < 2 or n in ("pos_embed", "cls_token", "pool.probe"):
                names.add(n)
        return names

    def head_param_names(self) -> set[str]:
        """The classifier: gets the decoupled head weight decay and LR multiplier."""
        return {n for n, _ in self.named_parameters() if n.startswith("head.")}

    def train_flops_per_sample(self) -> float:
        """Matmul FLOPs of forward + backward (3x forward) for one image."""
        a = self.args
        n, w = a.seq_len, a.width
        fwd = 2 * a.num_patches * a.in_channels * a.patch_size**2 * w  # patch embedding
        attn_proj = 4 * 2 * n * w * w
        attn_scores = 2 * 2 * n * n * w  # QK^T and attention @ V
        mlp = 2 * 2 * n * w * a.mlp_dim
        fwd += a.depth * (attn_proj + attn_scores + mlp)
        if a.head == "map":  # one query token attending over n tokens
            fwd += 2 * w * w * 2 + 2 * 2 * n * w * w + 2 * 2 * n * w + 2 * 2 * w * a.mlp_dim
        if a.num_classes > 0:
            fwd += 2 * w * a.num_classes
        return 3.0 * fwd

