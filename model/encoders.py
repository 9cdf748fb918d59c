"""Identity encoder (ResNeXt-50 32x4d -> 512) and pose encoder (MobileNetV2 -> 256).

Both are stock torchvision networks, randomly initialised (official: no ImageNet weights),
fed RGB in [0, 1] with no mean/std normalisation. `KeypointEncoder` is the FSTH+ baseline's
pose source (paper Sec. 4.1): landmark coordinates instead of a driver image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import MobileNetV2
from torchvision.models.resnet import Bottleneck, ResNet

from model.config import ModelConfig


@dataclass
class IdentityEmbedding:
    mean: torch.Tensor  # (B, identity_dim): what drives the generator
    per_frame: torch.Tensor  # (B, K, identity_dim): frame 0 feeds the embedding-match loss


class IdentityEncoder(nn.Module):
    """Embeds each of K identity frames and averages them (paper eq. 1)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = ResNet(
            Bottleneck,
            list(cfg.identity_layers),
            num_classes=cfg.identity_dim,
            groups=cfg.identity_groups,
            width_per_group=cfg.identity_width_per_group,
        )

    def forward(self, frames: torch.Tensor) -> IdentityEmbedding:
        """frames: (B, K, 3, H, W) in [0, 1]."""
        b, k = frames.shape[:2]
        per_frame = self.backbone(frames.flatten(0, 1)).unflatten(0, (b, k))
        return IdentityEmbedding(mean=per_frame.mean(dim=1), per_frame=per_frame)


class PoseEncoder(nn.Module):
    """Maps a (pose-augmented) driver frame to the latent pose descriptor."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.backbone = MobileNetV2(
            num_classes=cfg.pose_dim, width_mult=cfg.pose_width_mult, dropout=cfg.pose_dropout
        )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """frames: (N, 3, H, W) in [0, 1] -> (N, pose_dim)."""
        return self.backbone(frames)


class KeypointEncoder(nn.Module):
    """FSTH+ baseline: 2D landmarks -> pose vector, through an MLP instead of an image network.

    Landmarks are (N, num_keypoints, 2) (x, y) in crop coordinates divided by the crop size,
    so [0, 1] inside the crop whatever its resolution; they are centred to [-1, 1] here.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_keypoints = cfg.num_keypoints
        hidden = cfg.keypoint_hidden
        self.mlp = nn.Sequential(
            nn.Linear(2 * cfg.num_keypoints, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, cfg.pose_dim),
        )

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """points: (N, num_keypoints, 2) in [0, 1] -> (N, pose_dim)."""
        if points.dim() != 3 or tuple(points.shape[1:]) != (self.num_keypoints, 2):
            raise ValueError(
                f"keypoints must be (N, {self.num_keypoints}, 2), got {tuple(points.shape)}"
            )
        return self.mlp((points * 2 - 1).flatten(1))  # (N, pose_dim)
