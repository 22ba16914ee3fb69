"""An SD/SDXL-style text-conditioned UNet for one device: ``diffusers``' ``UNet2DConditionModel``
built from a config (no download), conditioned by a small ``transformers`` CLIP text encoder built
from a local config, with ScaleLong scaling of the long skip connections.

**Text conditioning.** A label becomes a caption of token ids ``[bos, word(label), eos, pad...]``
(one word per class) and the null class the empty caption ``[bos, eos, pad...]`` — the
unconditional input of classifier-free guidance, as Stable Diffusion trains it. The encoder's
last hidden states feed the cross-attention (projected when its width differs from
``cross_attention_dim``); with SDXL conditioning (``addition_embed_type="text_time"``) its pooled
output and the six size/crop ids (original size, crop offset, target size: here the image size
and no crop) enter the time embedding. Both the UNet and the encoder are trained from scratch.

**Long skips and ScaleLong** ("ScaleLong", Huang et al., NeurIPS 2023). A diffusers UNet keeps
every down-path output (``conv_in``'s first) and each up block concatenates some of them, the
deepest first. Skip ``i`` is numbered in the order the down path produces it: 0 is the outermost
(``conv_in``, consumed by the last up block), N - 1 the innermost (next to the middle block).
Before an up block consumes its skips they are multiplied by

* ``none``: 1 (no hook: the plain diffusers model);
* ``constant``: 1/sqrt(2) (the "1/sqrt(2)-CS" of Imagen, SR3, score-SDE);
* ``exponential``: kappa^i, the outermost skip kappa^0 = 1 and the innermost kappa^(N-1)
  (ScaleLong's CS; kappa = 1 gives back the plain model bit for bit);
* ``learnable``: a gate in (0, 1) per channel computed from the skip itself — ScaleLong's LS
  calibration module (mean-pool, Linear to 1/16, ReLU, Linear back, sigmoid); the UViT code gates
  per token with one module shared by all skips, whose token count is fixed, while a conv UNet's
  skips differ in channels and resolution, so each skip has its own module, gating channels
  (squeeze-and-excitation style). The last Linear starts at zero: every gate starts at 1/2.

Parameter names are diffusers' own under ``unet.`` (the hooks add none), so checkpoints of the
four variants differ only by the learnable gates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from bigtrain.models.args import UNetArgs

class SkipGate(nn.Module):
    """ScaleLong's learnable calibration of one skip: a gate in (0, 1) per channel."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1, self.fc2 = nn.Linear(channels, hidden), nn.Linear(hidden, channels)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, skip: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.fc2(torch.relu(self.fc1(skip.mean(dim=(2, 3))))))
        return skip * gate[:, :, None, None].to(skip.dtype)


class ConditionedUNet(nn.Module):
    def __init__(self, args: UNetArgs) -> None:
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        super().__init__()
        args.check()
        self.args = args
        self.unet = UNet2DConditionModel(**args.unet_config())
        text = CLIPTextConfig(vocab_size=3 + max(args.num_classes, 1), hidden_size=args.text_width,
                              intermediate_size=4 * args.text_width, num_hidden_layers=args.text_layers,
                              num_attention_heads=args.text_heads, max_position_embeddings=args.text_tokens,
                              bos_token_id=1, eos_token_id=2, pad_token_id=0)
        self.text_encoder = CLIPTextModel(text)
        self.text_proj = (nn.Linear(args.text_width, args.cross_attention_dim)
                          if args.text_width != args.cross_attention_dim else nn.Identity())
        self.skip_channels = self._skip_channels()
        self.skip_gates = nn.ModuleList([SkipGate(c) for c in self.skip_channels]) \
            if args.skip_scaling == "learnable" else nn.ModuleList()
        self._hooks = [block.register_forward_pre_hook(self._scale_hook(ids), with_kwargs=True)
                       for block, ids in zip(self.unet.up_blocks, self._skips_per_up_block())] \
            if args.skip_scaling != "none" else []

    # --- the interface of diffusion families ------------------------------------------------
    @property
    def null_class(self) -> int | None:
        return self.args.num_classes or None

    @property
    def learn_sigma(self) -> bool:
        return False

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.args.in_channels, self.args.image_size, self.args.image_size)

    def reset_buffers(self, device: torch.device) -> None:
        """The text encoder's position ids after ``to_empty`` (a non-persistent buffer)."""
        for module in self.text_encoder.modules():
            if "position_ids" in module._buffers:
                module.position_ids = torch.arange(self.args.text_tokens, device=device).expand(1, -1)

    def captions(self, y: torch.Tensor) -> torch.Tensor:
        """Token ids of each label's caption; the null class (or an unconditional model) -> empty."""
        n, length = y.shape[0], self.args.text_tokens
        ids = torch.zeros(n, length, dtype=torch.long, device=y.device)
        ids[:, 0] = 1
        empty = torch.ones_like(y, dtype=torch.bool) if self.null_class is None else y == self.null_class
        ids[:, 1] = torch.where(empty, torch.full_like(y, 2), y + 3)
        ids[:, 2] = torch.where(empty, torch.zeros_like(y), torch.full_like(y, 2))
        return ids

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        text = self.text_encoder(input_ids=self.captions(y))
        context = self.text_proj(text.last_hidden_state)
        added = None
        if self.args.sdxl_conditioning:
            s = float(self.args.image_size)
            ids = torch.tensor([s, s, 0.0, 0.0, s, s], device=x.device).expand(x.shape[0], 6)
            added = {"text_embeds": text.pooler_output, "time_ids": ids}
        return self.unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample

    # --- ScaleLong ----------------------------------------------------------------------------
    def _skip_channels(self) -> list[int]:
        """Channels of every long skip, in the order the down path produces them."""
        chans = [self.unet.conv_in.out_channels]
        for block in self.unet.down_blocks:
            chans += [r.out_channels for r in block.resnets]
            if block.downsamplers is not None:
                chans.append(block.downsamplers[0].out_channels)
        return chans

    def _skips_per_up_block(self) -> list[list[int]]:
        """For each up block, the production indices of the skips it receives (tuple order)."""
        remaining = list(range(len(self.skip_channels)))
        out = []
        for block in self.unet.up_blocks:
            k = len(block.resnets)
            out.append(remaining[-k:])
            remaining = remaining[:-k]
        return out

    def skip_coefficient(self, i: int) -> float:
        a = self.args
        return {"none": 1.0, "constant": 1 / math.sqrt(2), "exponential": a.skip_kappa ** i}.get(a.skip_scaling, 1.0)

    def _scale_hook(self, ids: list[int]) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            skips = kwargs["res_hidden_states_tuple"]
            if self.args.skip_scaling == "learnable":
                scaled = tuple(self.skip_gates[i](s) for i, s in zip(ids, skips))
            else:
                scaled = tuple(s * self.skip_coefficient(i) for i, s in zip(ids, skips))
            return args, {**kwargs, "res_hidden_states_tuple": scaled}

        return hook

    def macs_per_forward(self) -> float:
        """Multiply-accumulates of one forward, counted by torch's FLOP counter on the meta device."""
        from torch.utils.flop_counter import FlopCounterMode

        n = 1
        with torch.device("meta"):
            x = torch.zeros(n, *self.sample_shape)
            t, y = torch.zeros(n), torch.zeros(n, dtype=torch.long)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            self.forward(x, t, y)
        return counter.get_total_flops() / 2

    def train_flops_per_sample(self) -> float:
        return 6.0 * self.macs_per_forward()
