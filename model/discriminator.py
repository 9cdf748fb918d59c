"""Projection discriminator with a per-video (or per-avatar) embedding matrix (Section 3)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import DiscriminatorBlock, sn_conv, spectral_norm


@dataclass
class DiscriminatorOutput:
    score: torch.Tensor  # (B,) realism score (hinge loss input)
    features: list[torch.Tensor]  # stem + every block output, for feature matching


class DiscriminatorStem(nn.Module):
    """conv3 -> ReLU -> conv3 -> avgpool, plus a 1x1 conv -> avgpool skip (no leading ReLU)."""

    def __init__(self, c_out: int, sn_eps: float):
        super().__init__()
        self.conv1 = sn_conv(3, c_out, 3, sn_eps)
        self.conv2 = sn_conv(c_out, c_out, 3, sn_eps)
        self.skip = sn_conv(3, c_out, 1, sn_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))
        return F.avg_pool2d(h, 2) + F.avg_pool2d(self.skip(x), 2)


class Discriminator(nn.Module):
    """Sees masked RGB only; score = w.h + <embed[label], h>, h = sum-pooled ReLU features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        # Width doubles per halving from num_channels at the stem (one level behind G).
        res, c = cfg.image_size // 2, cfg.num_channels
        self.stem = DiscriminatorStem(c, cfg.sn_eps)
        blocks = []
        while res > cfg.const_size:
            c_out = min(2 * c, cfg.max_channels)
            blocks.append(DiscriminatorBlock(c, c_out, True, cfg.sn_eps))
            c, res = c_out, res // 2
        # The last block ends at identity_dim channels (512 = max_channels in official-256),
        # so the projection embedding lives in identity space: the embedding-match loss
        # compares it with identity vectors and fine-tuning initialises it from one.
        blocks.append(DiscriminatorBlock(c, cfg.identity_dim, False, cfg.sn_eps))
        self.blocks = nn.ModuleList(blocks)
        c = cfg.identity_dim
        self.linear = spectral_norm(nn.Linear(c, 1), cfg.sn_eps)
        embed = nn.Embedding(cfg.num_labels, c)
        nn.init.uniform_(embed.weight, -0.1, 0.1)
        self.embed = spectral_norm(embed, cfg.embed_sn_eps)

    def forward(
        self, images: torch.Tensor, labels: torch.Tensor, detach_embed: bool = False
    ) -> DiscriminatorOutput:
        """images: (B, 3, H, W) masked RGB in [0, 1]; labels: (B,) video or avatar rows.

        `detach_embed` is for the discriminator's fake pass: the embedding learns only
        from real images (official).
        """
        h = self.stem(images)
        features = []
        for block in self.blocks:
            # The official in-place ReLU leaves every map but the last ReLU'd.
            features.append(F.relu(h))
            h = block(h)
        features.append(h)
        pooled = F.relu(h).sum(dim=(2, 3))  # (B, C)
        embed = self.embed(labels)
        if detach_embed:
            embed = embed.detach()
        score = self.linear(pooled).squeeze(1) + (embed * pooled).sum(dim=1)
        return DiscriminatorOutput(score=score, features=features)
