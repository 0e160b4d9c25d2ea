"""Class-conditional UNet denoiser ε_θ(z_t, t, y) (Ho et al. 2020; Dhariwal & Nichol 2021)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.models.configs import UNetConfig
from training.models.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimeEmbedding,
    Upsample,
    group_norm,
)


class _Level(nn.Module):
    """A residual block, optionally followed by self-attention."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, cfg: UNetConfig, attend: bool):
        super().__init__()
        self.res = ResBlock(in_ch, out_ch, emb_dim, cfg.dropout)
        self.attn = AttentionBlock(out_ch, cfg.num_heads) if attend else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """Predicts the noise ε in z_t = √ᾱ_t z_0 + √(1−ᾱ_t) ε.

    Inputs: z_t [B, in_channels, h, w] (h, w divisible by the config's
    downsample_factor), t long [B] in 0 … T−1, y long [B] in 0 … num_classes
    (``num_classes`` = the learned null label) or None for unconditional.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = TimeEmbedding(mc, emb_dim)
        self.class_embed = nn.Embedding(config.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, mc, 3, padding=1)

        lowest = len(config.channel_mult) - 1
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips, ch = [mc], mc
        for level, mult in enumerate(config.channel_mult):
            attend = config.attention and level == lowest
            for _ in range(config.num_res_blocks):
                self.down.append(_Level(ch, mc * mult, emb_dim, config, attend))
                ch = mc * mult
                skips.append(ch)
            if level < lowest:
                self.downsample.append(Downsample(ch))
                skips.append(ch)

        self.mid = nn.ModuleList(
            [
                _Level(ch, ch, emb_dim, config, config.attention),
                _Level(ch, ch, emb_dim, config, False),
            ]
        )

        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for level, mult in reversed(list(enumerate(config.channel_mult))):
            attend = config.attention and level == lowest
            for _ in range(config.num_res_blocks + 1):
                self.up.append(_Level(ch + skips.pop(), mc * mult, emb_dim, config, attend))
                ch = mc * mult
            if level > 0:
                self.upsample.append(Upsample(ch))

        self.norm_out = group_norm(ch)
        self.conv_out = nn.Conv2d(ch, config.in_channels, 3, padding=1)
        # Start as the zero predictor: the first steps do not fight random output noise.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if y is None:
            y = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        emb = self.time_embed(t)
        emb = emb + self.class_embed(y)

        h = self.conv_in(x)
        skips = [h]
        per_level = self.config.num_res_blocks
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            level = i // per_level
            if (i + 1) % per_level == 0 and level < len(self.downsample):
                h = self.downsample[level](h)
                skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            level = i // (per_level + 1)
            if (i + 1) % (per_level + 1) == 0 and level < len(self.upsample):
                h = self.upsample[level](h)
        return self.conv_out(F.silu(self.norm_out(h)))
