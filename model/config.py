"""Model configuration: one frozen dataclass and the named presets (paper Section 3)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

PoseSource = Literal["latent", "keypoints"]
POSE_SOURCES: tuple[str, ...] = ("latent", "keypoints")


@dataclass(frozen=True)
class ModelConfig:
    """Every number that shapes the networks; defaults are the official release (`official-256`)."""

    name: str = "official-256"
    image_size: int = 256
    identity_dim: int = 512
    pose_dim: int = 256

    # Generator: a learned const_size^2 constant, num_res_blocks residual blocks at that
    # resolution, then one upsampling block per doubling up to image_size.
    const_size: int = 4
    num_channels: int = 64  # channels at full resolution; doubled per halving ...
    max_channels: int = 512  # ... up to this cap (generator and discriminator alike)
    num_res_blocks: int = 2
    norm_eps: float = 1e-4  # InstanceNorm eps inside AdaIN
    sn_eps: float = 1e-4  # spectral norm eps of every conv / D layer
    mlp_sn_eps: float = 1e-12  # the AdaIN MLP keeps torch's default eps (official quirk)

    # Identity encoder: torchvision ResNet with bottleneck blocks (ResNeXt-50 32x4d by default).
    identity_layers: tuple[int, ...] = (3, 4, 6, 3)
    identity_groups: int = 32
    identity_width_per_group: int = 4

    # Pose encoder: torchvision MobileNetV2.
    pose_width_mult: float = 1.0
    pose_dropout: float = 0.2

    # Research baselines and ablations (README, "Baselines and ablations"); the defaults are
    # the paper's model. pose_source "keypoints" is the paper's FSTH+ baseline: num_keypoints
    # 2D landmarks go through a small MLP to pose_dim and the same AdaIN path, no pose image.
    # predict_mask False is the "no segmentation" ablation: RGB only, trained on whole frames.
    pose_source: PoseSource = "latent"
    num_keypoints: int = 68  # iBUG-68, what the synthetic clip stores carry
    keypoint_hidden: int = 256
    predict_mask: bool = True

    # Projection discriminator: one embedding row per training video (meta-learning) or a
    # single row per avatar (fine-tuning, which re-creates the embedding with eps 1e-12).
    num_labels: int = 1
    embed_sn_eps: float = 1e-4

    def __post_init__(self) -> None:
        if self.image_size % self.const_size or not _is_pow2(self.image_size // self.const_size):
            raise ValueError(
                f"image_size/const_size must be a power of two, got {self.image_size}/"
                f"{self.const_size}"
            )
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16, got {self.image_size}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if len(self.identity_layers) != 4:
            raise ValueError("identity_layers needs four stage depths (a torchvision ResNet)")
        if self.pose_source not in POSE_SOURCES:
            raise ValueError(f"pose_source must be one of {POSE_SOURCES}, got {self.pose_source!r}")
        if self.num_keypoints < 1 or self.keypoint_hidden < 1 or self.pose_dim < 1:
            raise ValueError("num_keypoints, keypoint_hidden and pose_dim must be positive")

    # --- derived sizes -------------------------------------------------------------------
    @property
    def num_up_blocks(self) -> int:
        """Generator upsampling blocks: one per doubling from const_size to image_size."""
        return int(math.log2(self.image_size // self.const_size))

    def channels_at(self, resolution: int) -> int:
        """Feature channels at a given spatial resolution (same rule in G and D)."""
        return min(self.max_channels, self.num_channels * self.image_size // resolution)

    @property
    def mlp_hidden(self) -> int:
        return max(self.identity_dim + self.pose_dim, 512)

    # --- serialisation -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {unknown}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        return cls(**values)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset, optionally with fields replaced (e.g. num_labels for training)."""
        if name not in PRESETS:
            raise KeyError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# Identity and pose sizes stay 512/256 in every preset, so avatars' identity vectors and
# pose descriptors have one wire format across the service whatever network runs them.
PRESETS: dict[str, ModelConfig] = {
    "official-256": ModelConfig(),
    "small-128": ModelConfig(
        name="small-128",
        image_size=128,
        num_channels=32,
        max_channels=256,
        identity_layers=(2, 2, 2, 2),
        identity_groups=16,
        pose_width_mult=0.5,
    ),
    "tiny-64": ModelConfig(
        name="tiny-64",
        image_size=64,
        num_channels=16,
        max_channels=128,
        identity_layers=(1, 1, 1, 1),
        identity_groups=8,
        pose_width_mult=0.35,
    ),
}
