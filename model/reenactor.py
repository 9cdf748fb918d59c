"""The reenactment model: identity encoder + pose encoder + generator (what EMA tracks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.config import ModelConfig
from model.encoders import IdentityEmbedding, IdentityEncoder, KeypointEncoder, PoseEncoder
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
        # The FSTH+ baseline has a landmark MLP instead of the image pose encoder (a model has
        # one or the other, so exporters written for pose_encoder fail loudly on a baseline).
        if cfg.pose_source == "keypoints":
            self.keypoint_encoder = KeypointEncoder(cfg)
        else:
            self.pose_encoder = PoseEncoder(cfg)
        self.generator = Generator(cfg)

    def embed_identity(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, K, 3, H, W) identity frames -> (B, identity_dim), the mean over K."""
        return self.identity_encoder(frames).mean

    def encode_pose(self, driver: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) driver frames, or (N, L, 2) landmarks for pose_source "keypoints",
        -> (N, pose_dim)."""
        if self.cfg.pose_source == "keypoints":
            return self.keypoint_encoder(driver)
        return self.pose_encoder(driver)

    def render(self, identity: torch.Tensor, pose: torch.Tensor) -> GeneratorOutput:
        """identity (N, identity_dim) or (identity_dim,), pose (N, pose_dim)."""
        if identity.dim() == 1:
            identity = identity.expand(pose.shape[0], -1)
        return self.generator(identity, pose)

    def forward(self, identity_frames: torch.Tensor, driver: torch.Tensor) -> ReenactmentOutput:
        """Meta-learning forward: K identity frames and one driver (frame or landmarks) each."""
        identity = self.identity_encoder(identity_frames)
        out = self.render(identity.mean, self.encode_pose(driver))
        return ReenactmentOutput(rgb=out.rgb, mask=out.mask, identity=identity)
