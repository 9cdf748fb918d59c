"""Meta-learning and fine-tuning losses (paper Section 3; weights from the official config).

Fixed official bugs, each documented: the dice loss compares 1-channel masks with
1-channel masks (the official code fed a 3-channel target, giving -log 1.5 for a perfect
mask); the perceptual networks see [0, 1] images (the official code mapped (x + 1) / 2
first, so they saw [0.5, 1]) unless `official_input_range` asks for the old behaviour.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import vgg

# Caffe-style means (BGR order values, applied without a channel swap, as official).
VGG_MEAN = (103.939, 116.779, 123.68)
VGG19_RELUS = (1, 3, 6, 8, 11, 13, 15, 17, 20, 22, 24, 26, 29)  # up to relu5_1
VGG16_RELUS = (1, 3, 6, 8, 11, 13, 15, 18, 20, 22, 25, 27, 29)  # up to relu5_3
VGGFACE_CROP = 1 / 1.8  # fixed centre crop, resampled back to full size


@dataclass(frozen=True)
class LossWeights:
    """Official meta-learning weights; 0 disables a term."""

    adversarial: float = 1.0
    feature_matching: float = 10.0
    vgg19: float = 3e-2
    vggface: float = 6e-3
    dice: float = 1.0
    embedding_match: float = 1e-2  # meta-learning only
    l1: float = 0.0  # named deviation: pixel L1, for runs without perceptual weights


# --- adversarial -------------------------------------------------------------------------
def hinge_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real).mean() + F.relu(1 + fake).mean()


def hinge_g(fake: torch.Tensor) -> torch.Tensor:
    return -fake.mean()


def feature_matching(fake: list[torch.Tensor], real: list[torch.Tensor]) -> torch.Tensor:
    """Mean over discriminator maps of L1(fake, real), real detached."""
    terms = [F.l1_loss(f, r.detach()) for f, r in zip(fake, real, strict=True)]
    return torch.stack(terms).mean()


# --- masks and embeddings ----------------------------------------------------------------
def dice(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """-log(2 sum(p t) / (sum p^2 + sum t^2)) over the batch; 0 for a perfect mask."""
    if pred.shape != target.shape:
        raise ValueError(f"dice needs equal shapes, got {pred.shape} and {target.shape}")
    inter = (pred * target).sum()
    return -torch.log((2 * inter + eps) / (pred.square().sum() + target.square().sum() + eps))


def embedding_match(identity_frame0: torch.Tensor, embed_rows: torch.Tensor) -> torch.Tensor:
    """L1 between frame 0's identity vector and its video's D embedding (detached)."""
    return F.l1_loss(identity_frame0, embed_rows.detach())


# --- perceptual ----------------------------------------------------------------------------
class PerceptualLoss(nn.Module):
    """Sum over ReLU outputs of mean L1 between VGG features of output and target.

    Weights come from a local file (no downloads): a torchvision-style state dict with
    `features.N.*` (or bare `N.*`) keys; classifier keys are ignored.
    """

    def __init__(
        self,
        kind: str,
        weights: str | os.PathLike[str],
        official_input_range: bool = False,
    ):
        super().__init__()
        if kind == "vgg19":
            features, relus = vgg_features("vgg19"), VGG19_RELUS
            # Official: average pooling instead of max pooling in the VGG19 loss.
            for i, layer in enumerate(features):
                if isinstance(layer, nn.MaxPool2d):
                    features[i] = nn.AvgPool2d(2, 2)
        elif kind == "vggface":
            features, relus = vgg_features("vgg16"), VGG16_RELUS
        else:
            raise ValueError(f"unknown perceptual network {kind!r}")
        load_features(features, weights)
        self.kind = kind
        self.features = features.eval().requires_grad_(False)
        self.relus = set(relus)
        self.official_input_range = official_input_range
        self.mean: torch.Tensor
        self.register_buffer("mean", torch.tensor(VGG_MEAN).view(1, 3, 1, 1) / 255)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.features.eval()  # frozen network: keep it in eval mode
        return self

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.official_input_range:
            x = (x + 1) / 2
        if self.kind == "vggface":
            x = center_crop_resample(x, VGGFACE_CROP)
        return (x - self.mean) * 255

    def _activations(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.relus:
                out.append(x)
        return out

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        fake = self._activations(self._prepare(output))
        with torch.no_grad():
            real = self._activations(self._prepare(target))
        return torch.stack([F.l1_loss(f, r) for f, r in zip(fake, real, strict=True)]).sum()


def vgg_features(arch: str) -> nn.Sequential:
    """The first 30 `features` layers of torchvision's VGG16/19 (no classifier is built)."""
    layers = vgg.make_layers(vgg.cfgs["D" if arch == "vgg16" else "E"])
    return nn.Sequential(*list(layers)[:30])


def center_crop_resample(x: torch.Tensor, fraction: float) -> torch.Tensor:
    """Bilinear resample of the central `fraction` of each image to full size (reflection)."""
    b = x.shape[0]
    theta = torch.tensor([[fraction, 0, 0], [0, fraction, 0]], dtype=x.dtype, device=x.device)
    grid = F.affine_grid(theta.expand(b, 2, 3), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def load_features(features: nn.Sequential, path: str | os.PathLike[str]) -> None:
    """Load `features.*` weights from a local state-dict file (weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"perceptual weights not found: {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    feats = {
        k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier")
    }
    own = features.state_dict()
    missing = sorted(set(own) - set(feats))
    if missing:
        raise ValueError(f"{path}: missing VGG feature weights {missing[:6]}")
    features.load_state_dict({k: feats[k] for k in own}, strict=True)
