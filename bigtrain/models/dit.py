"""DiT: the class-conditional diffusion transformer of "Scalable Diffusion Models with Transformers"
(Peebles & Xie), written for one device.

Patchify (a conv with kernel = stride = p) + fixed 2-D sin-cos positions → N adaLN-Zero blocks,
conditioned on c = timestep embedding + label embedding → an adaLN final layer → unpatchify. With
``learn_sigma`` the output has twice the input channels (epsilon, then the variance interpolation).

Differences from the reference code, none of which changes a parameter count or a function:

* q, k and v are three ``Linear`` layers instead of one fused ``qkv`` (column-parallel TP shards each
  of them whole-head; the fused one would need a permutation);
* the position embedding is a non-persistent buffer, not a frozen ``Parameter`` (so it is not in the
  parameter count, the optimizer or an EMA loop);
* the label embedder only embeds: dropping labels to the null class (id ``num_classes``) for
  classifier-free guidance is the objective's job, drawn per sample from a seeded generator so a
  changed layout or resume drops the same labels.

Blocks live in ``blocks`` (a ``ModuleDict`` keyed "0", "1", ...): stable checkpoint keys, FSDP and
activation-checkpointing units.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bigtrain.models.args import DiTArgs

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (possibly fractional) timesteps, laid out cat[cos, sin] (GLIDE's order,
    which DiT keeps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def sincos_2d(width: int, grid: int) -> torch.Tensor:
    """MAE's 2-D sin-cos table as DiT uses it, (1, grid*grid, width): half the channels encode one
    axis and half the other, each [sin, cos] with frequencies 1/10000^(i / (width/4))."""
    coords = torch.arange(grid, dtype=torch.float64)
    gw, gh = torch.meshgrid(coords, coords, indexing="xy")  # MAE's grid[0] runs along the width

    def axis(pos: torch.Tensor) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(width // 4, dtype=torch.float64) / (width / 4))
        out = pos.reshape(-1)[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([axis(gw), axis(gh)], dim=1).float()[None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # -1: under TP each rank holds a share of the heads
            return t.view(b, n, -1, self.head_dim).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)))
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))

    @property
    def head_dim(self) -> int:
        return self.q.in_features // self.num_heads


class Mlp(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DiTBlock(nn.Module):
    """adaLN-Zero: shift, scale and gate of both sub-layers regressed from c; the gates start at 0,
    so the block starts as the identity."""

    def __init__(self, width: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, args: DiTArgs) -> None:
        super().__init__()
        args.check()
        self.args = args
        d, p = args.width, args.patch_size
        self.patch_embed = nn.Conv2d(args.in_channels, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", sincos_2d(d, args.input_size // p), persistent=False)
        self.t_embedder = nn.Sequential(nn.Linear(args.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Embedding(args.num_classes + 1, d)  # + the null class of guidance
        self.blocks = nn.ModuleDict({str(i): DiTBlock(d, args.num_heads, args.mlp_ratio) for i in range(args.depth)})
        self.final_layer = FinalLayer(d, p, args.out_channels)
        self.reset_parameters()

    @property
    def null_class(self) -> int | None:
        """The label of "no class" (classifier-free guidance); None for an unconditional model
        (``num_classes`` 0: its one label embedding is the null one)."""
        return self.args.num_classes or None

    @property
    def learn_sigma(self) -> bool:
        return self.args.learn_sigma

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of what the model denoises."""
        return (self.args.in_channels, self.args.input_size, self.args.input_size)

    def reset_parameters(self) -> None:
        """DiT's initialisation: xavier-uniform Linears with zero bias, the patch conv like a Linear,
        N(0, 0.02) for the label table and the timestep MLP, and zeros for every adaLN regression and
        the final projection (adaLN-Zero)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.y_embedder.weight, std=0.02)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks.values():
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def reset_buffers(self, device: torch.device) -> None:
        """The position table after ``to_empty`` (a buffer derived from the sizes, never saved)."""
        self.pos_embed = sincos_2d(self.args.width, self.args.input_size // self.args.patch_size).to(device)

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """c = timestep embedding + label embedding (``y`` == ``null_class`` for unconditional)."""
        return self.t_embedder(timestep_embedding(t, self.args.freq_dim).to(self.t_embedder[0].weight.dtype)) \
            + self.y_embedder(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) noisy input; t: (B,) timesteps; y: (B,) labels (ignored, all null, when
        unconditional). Returns (B, out_channels, H, W)."""
        if not self.args.num_classes:
            y = torch.zeros_like(y)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        c = self.condition(t, y)
        for block in self.blocks.values():
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def unpatchify(self, h: torch.Tensor) -> torch.Tensor:
        p, ch = self.args.patch_size, self.args.out_channels
        g = self.args.input_size // p
        h = h.reshape(h.shape[0], g, g, p, p, ch)
        return torch.einsum("nhwpqc->nchpwq", h).reshape(h.shape[0], ch, g * p, g * p)

    def macs_per_forward(self) -> float:
        """Multiply-accumulates of one forward (DiT's published "Gflops" are these): per token and
        block 12·d² (q, k, v, proj: 4d², MLP: 8d² at ratio 4) + 2·T·d (scores and values), plus the
        patch embedding, the adaLN regressions and the final projection."""
        a = self.args
        d, t = a.width, a.num_tokens
        hidden = int(d * a.mlp_ratio)
        per_block = t * (4 * d * d + 2 * d * hidden + 2 * t * d) + d * 6 * d
        embed = t * d * a.in_channels * a.patch_size ** 2 + a.freq_dim * d + d * d
        final = d * 2 * d + t * d * a.patch_size ** 2 * a.out_channels
        return float(a.depth * per_block + embed + final)

    def train_flops_per_sample(self) -> float:
        """Hardware FLOPs of one training sample: 2 per MAC, forward + backward = 3 forwards."""
        return 6.0 * self.macs_per_forward()
