"""The models an evaluation scores: loading, driving by image or by landmarks, fine-tuning.

The one place that knows how model variants differ at inference (config.pose_source,
config.predict_mask), so the suites treat the paper's model, its baselines and its ablations
alike and can compare them side by side.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import read_header
from model.inference import InferenceModel
from training.finetune import FinetuneConfig, file_sha256, finetune
from training.losses import LossWeights


@dataclass
class ScoredModel:
    """A checkpoint under evaluation: its name in reports, its file and the loaded model."""

    name: str
    path: Path
    model: InferenceModel
    # What fine-tuning starts from: a training checkpoint carries the meta-learned
    # discriminator that a released (EMA-only) one lacks; same EMA weights.
    finetune_base: Path | None = None

    @property
    def base(self) -> Path:
        return self.finetune_base or self.path

    def header(self) -> dict[str, object]:
        """What names the scored weights exactly (metrics.json's `checkpoint`)."""
        cfg, info = read_header(self.path)
        return {
            "path": str(self.path),
            "sha256": file_sha256(self.path),
            "preset": cfg.name,
            "step": info.get("step"),
            "pose_source": pose_source(self.model),
            "predicts_mask": predicts_mask(self.model),
            "finetune_base": str(self.base),
        }


def load(
    name: str, path: Path, device: str = "cpu", finetune_base: Path | None = None
) -> ScoredModel:
    """Load a checkpoint's EMA weights for scoring."""
    model = InferenceModel.from_checkpoint(path, device=device)
    return ScoredModel(name, path, model, finetune_base)


def from_manifest(path: Path) -> list[tuple[str, Path, Path | None]]:
    """(name, checkpoint, fine-tuning base) of each variant `python -m training.ablations` lists,
    the paper's model first: every baseline and ablation trained at one budget."""
    from training.ablations import read_manifest

    manifest = read_manifest(path)
    return [
        (
            name,
            run.checkpoint,
            run.training_checkpoint if run.training_checkpoint.is_file() else None,
        )
        for name, run in manifest.variants.items()
    ]


def pose_source(model: InferenceModel) -> str:
    """ "latent" (a pose image) or "keypoints" (the FSTH+ baseline: 2D landmarks)."""
    return str(getattr(model.config, "pose_source", "latent"))


def predicts_mask(model: InferenceModel) -> bool:
    """False for the "no segmentation" ablation: its output is a whole frame."""
    return bool(getattr(model.config, "predict_mask", True))


def _pixels(frames: torch.Tensor, model: InferenceModel) -> torch.Tensor:
    x = frames.float() / 255 if frames.dtype == torch.uint8 else frames.float()
    return x.to(model.device)


@torch.inference_mode()
def encode_drivers(
    model: InferenceModel, frames: torch.Tensor, landmarks: np.ndarray | None
) -> torch.Tensor:
    """Pose descriptors (N, pose_dim) of driver crops (N, 3, S, S).

    A keypoint-driven model reads `landmarks` (N, L, 2) in crop pixels instead, divided by
    the crop size as its training data are (model.encoders.KeypointEncoder).
    """
    if pose_source(model) != "keypoints":
        return model.encode_pose(frames)
    if landmarks is None:
        raise ValueError("a keypoint-driven model needs the drivers' landmarks")
    points = torch.from_numpy(np.asarray(landmarks, np.float32) / model.config.image_size)
    return model.net.encode_pose(points.to(model.device)).float()


@torch.inference_mode()
def embed_each(model: InferenceModel, frames: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """One identity embedding per frame (N, identity_dim): K = 1, as a single photo gives."""
    out = [
        model.net.embed_identity(_pixels(frames[i : i + batch], model)[:, None]).float()
        for i in range(0, len(frames), batch)
    ]
    return torch.cat(out)


def can_finetune(model: InferenceModel) -> str | None:
    """None, or why training.finetune cannot tune this variant."""
    if pose_source(model) == "keypoints":
        return (
            "training.finetune drives the avatar with pose images; keypoint models need landmarks"
        )
    return None


def finetuned(
    base: Path,
    images: np.ndarray,
    masks: np.ndarray,
    steps: int,
    mode: str,
    seed: int,
    device: str = "cpu",
) -> InferenceModel:
    """An avatar fine-tuned on (N, S, S, 3) uint8 photos and (N, S, S) masks (paper, Sec. 3).

    No perceptual-loss weights ship here, so pixel L1 stands in for the VGG losses (as in
    training.evaluate_demo); the adversarial and feature-matching terms stay.
    """
    cfg = FinetuneConfig(
        mode="light" if mode == "light" else "full",
        steps=steps,
        losses=LossWeights(vgg19=0, vggface=0, embedding_match=0, l1=10),
        seed=seed,
    )
    with tempfile.TemporaryDirectory() as tmp:
        result = finetune(base, images, masks, Path(tmp) / "avatar.safetensors", cfg, device=device)
        return InferenceModel.from_checkpoint(result.avatar, device=device, base=base)
