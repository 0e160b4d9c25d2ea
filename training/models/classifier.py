"""Noisy-latent classifier p_φ(y | z_t, t) for classifier guidance (Dhariwal & Nichol 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from training.models.configs import ClassifierConfig
from training.models.layers import Downsample, ResBlock, TimeEmbedding, group_norm


class NoisyLatentClassifier(nn.Module):
    """Logits [B, num_classes] for noised latents z_t [B, in_channels, h, w] at
    timesteps t (long [B], 0 … T−1). The encoder half of a UNet, then global
    average pooling and a linear head."""

    def __init__(self, config: ClassifierConfig):
        super().__init__()
        self.config = config
        self.num_classes = config.num_classes
        mc, emb_dim = config.model_channels, 4 * config.model_channels
        self.time_embed = TimeEmbedding(mc, emb_dim)
        self.conv_in = nn.Conv2d(config.in_channels, mc, 3, padding=1)
        self.blocks = nn.ModuleList()
        ch = mc
        for level, mult in enumerate(config.channel_mult):
            for _ in range(config.num_res_blocks):
                self.blocks.append(ResBlock(ch, mc * mult, emb_dim))
                ch = mc * mult
            if level < len(config.channel_mult) - 1:
                self.blocks.append(Downsample(ch))
        self.norm_out = group_norm(ch)
        self.head = nn.Linear(ch, config.num_classes)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_embed(t)
        h = self.conv_in(x)
        for block in self.blocks:
            h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        h = F.silu(self.norm_out(h)).mean(dim=(2, 3))
        return self.head(h)
