"""The reenactment model: identity encoder + pose encoder + generator (what EMA tracks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import ModelConfig
from model.encoders import IdentityEmbedding, IdentityEncoder, PoseEncoder
from model.generator import Generator, GeneratorOutput


@dataclass
class ReenactmentOutput(GeneratorOutput):
    identity: IdentityEmbedding  # mean and per-frame vectors (frame 0 feeds embedding match)


class Reenactor(nn.Module):
    """Differentiable forward used by training; `model.inference` wraps it for serving."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.identity_encoder = IdentityEncoder(cfg)
        self.pose_encoder = PoseEncoder(cfg)
        self.generator = Generator(cfg)

    def embed_identity(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) identity frames -> (B, identity_dim), the mean over K."""
        return self.identity_encoder(frames).mean

    def encode_pose(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) driver frames -> (N, pose_dim)."""
        return self.pose_encoder(frames)

    def render(self, identity: torch.Tensor, pose: torch.Tensor) -> GeneratorOutput:
        """identity (N, identity_dim) or (identity_dim,), pose (N, pose_dim)."""
        if identity.dim() == 1:
            identity = identity.expand(pose.shape[0], -1)
        return self.generator(identity, pose)

    def forward(self, identity_frames: torch.Tensor, driver: torch.Tensor) -> ReenactmentOutput:
        """Meta-learning forward: K identity frames and one driver frame per sample."""
        identity = self.identity_encoder(identity_frames)
        out = self.render(identity.mean, self.encode_pose(driver))
        return ReenactmentOutput(rgb=out.rgb, mask=out.mask, identity=identity)
