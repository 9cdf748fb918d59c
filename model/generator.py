"""AdaIN MLP and generator: learned 4x4 constant -> RGB image + foreground mask (Section 3)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers import AdaIN, GeneratorBlock, sn_conv, spectral_norm


@dataclass
class GeneratorOutput:
    rgb: torch.Tensor  # (B, 3, H, W) in (-0.25, 1.25), not yet multiplied by the mask
    mask: torch.Tensor  # (B, 1, H, W) in (0, 1), foreground probability

    @property
    def masked_rgb(self) -> torch.Tensor:
        """rgb * mask: what the discriminator and losses see (black background)."""
        return self.rgb * self.mask


class AdaINProjector(nn.Module):
    """SN-Linear -> ReLU -> SN-Linear from [identity || pose] to every AdaIN beta/gamma."""

    def __init__(self, cfg: ModelConfig, num_outputs: int):
        super().__init__()
        d_in = cfg.identity_dim + cfg.pose_dim
        self.fc1 = spectral_norm(nn.Linear(d_in, cfg.mlp_hidden), cfg.mlp_sn_eps)
        self.fc2 = spectral_norm(nn.Linear(cfg.mlp_hidden, num_outputs), cfg.mlp_sn_eps)

    def forward(self, identity: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.cat([identity, pose], dim=1))))


class Generator(nn.Module):
    """Constant -> residual blocks -> upsampling residual blocks -> AdaIN-ReLU-conv3-tanh head.

    All AdaIN parameters come from one MLP output, consumed layer by layer in forward
    order; each layer takes its first C values as beta, the next C as gamma (official).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        c = cfg.channels_at(cfg.const_size)
        self.constant = nn.Parameter(torch.ones(1, c, cfg.const_size, cfg.const_size))
        blocks = [
            GeneratorBlock(c, c, False, cfg.norm_eps, cfg.sn_eps) for _ in range(cfg.num_res_blocks)
        ]
        res = cfg.const_size
        for _ in range(cfg.num_up_blocks):
            c_out = cfg.channels_at(res * 2)
            blocks.append(GeneratorBlock(c, c_out, True, cfg.norm_eps, cfg.sn_eps))
            c, res = c_out, res * 2
        self.blocks = nn.ModuleList(blocks)
        self.head_norm = AdaIN(c, cfg.norm_eps)
        # 3x3 as in the code (the paper says 1x1); RGB + mask, or RGB alone without the mask.
        self.head = sn_conv(c, 4 if cfg.predict_mask else 3, 3, cfg.sn_eps)
        self.mlp = AdaINProjector(cfg, num_outputs=2 * sum(n.channels for n in self.adain_layers()))

    def adain_layers(self) -> list[AdaIN]:
        """AdaIN layers in the order they consume the MLP output."""
        layers: list[AdaIN] = []
        for block in cast("list[GeneratorBlock]", list(self.blocks)):
            layers += [block.norm1, block.norm2]
        return [*layers, self.head_norm]

    def split_adain_params(self, params: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(B, 2*sum C) -> [(beta, gamma)] per AdaIN layer."""
        sizes = [size for n in self.adain_layers() for size in (n.channels, n.channels)]
        chunks = torch.split(params, sizes, dim=1)
        return list(zip(chunks[0::2], chunks[1::2], strict=True))

    def forward(self, identity: torch.Tensor, pose: torch.Tensor) -> GeneratorOutput:
        """identity: (B, identity_dim), pose: (B, pose_dim)."""
        adain = self.split_adain_params(self.mlp(identity, pose))
        x = self.constant.expand(identity.shape[0], -1, -1, -1)
        for i, block in enumerate(self.blocks):
            (b1, g1), (b2, g2) = adain[2 * i], adain[2 * i + 1]
            x = block(x, [b1, g1, b2, g2])
        beta, gamma = adain[-1]
        t = torch.tanh(self.head(F.relu(self.head_norm(x, beta, gamma))))  # (B, 4 or 3, H, W)
        if not self.cfg.predict_mask:  # "no segmentation" ablation: the whole frame is foreground
            return GeneratorOutput(rgb=0.75 * t + 0.5, mask=torch.ones_like(t[:, :1]))
        return GeneratorOutput(rgb=0.75 * t[:, :3] + 0.5, mask=0.5 * t[:, 3:] + 0.5)
