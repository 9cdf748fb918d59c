"""Inference facade: the one entry point the service, workers and exporters use.

Tensor conventions (inputs and outputs):
- images are (N, 3, H, W) RGB, H = W = config.image_size, float in [0, 1] or uint8 in
  [0, 255] (converted); any device (moved to the model's).
- identity is a float32 (identity_dim,) vector; poses are float32 (N, pose_dim).
- keypoints (the FSTH+ baseline, config.pose_source "keypoints") are (N, L, 2) float (x, y)
  in crop pixels divided by the crop size; such a model has no image pose encoder.
- `render` returns float32 on the model's device: rgb (N, 3, H, W) in [0, 1], already
  multiplied by the mask (black background, as the official drive.py writes), and mask
  (N, 1, H, W) in [0, 1]. Composite over a background with rgb + (1 - mask) * background.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from model.checkpoint import instantiate, load_checkpoint
from model.config import ModelConfig
from model.layers import fold_spectral_norm
from model.reenactor import Reenactor


@dataclass
class RenderOutput:
    rgb: torch.Tensor  # (N, 3, H, W) float32 in [0, 1], premultiplied by mask
    mask: torch.Tensor  # (N, 1, H, W) float32 in [0, 1]


class InferenceModel:
    """Eval-mode reenactor with no_grad, optional autocast and optional torch.compile."""

    def __init__(
        self,
        reenactor: Reenactor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        compile: bool | str = False,
        avatar_identity: torch.Tensor | None = None,
    ):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        self.config: ModelConfig = reenactor.cfg
        self.device = torch.device(device)
        self.dtype = dtype
        # A private copy (deepcopy would share parametrized classes with the caller's model),
        # with eval-mode spectral norm folded once, since it is a constant rescale.
        state = {k: v.detach().clone() for k, v in reenactor.state_dict().items()}
        net = instantiate(Reenactor, self.config, state, "reenactor")
        net = fold_spectral_norm(net.eval()).to(self.device)
        self.net = net
        # compile=True: torch.compile's default mode; a string picks the mode, e.g.
        # "reduce-overhead" (CUDA graphs) for launch-bound single-frame GPU inference.
        mode = compile if isinstance(compile, str) else None
        self._graphs = mode is not None and "reduce-overhead" in mode
        self.keypoints = self.config.pose_source == "keypoints"
        pose_net = net.keypoint_encoder if self.keypoints else net.pose_encoder
        self._pose = torch.compile(pose_net, mode=mode) if compile else pose_net
        self._generator = torch.compile(net.generator, mode=mode) if compile else net.generator
        self.avatar_identity = (
            None if avatar_identity is None else avatar_identity.float().to(self.device)
        )

    @classmethod
    def from_checkpoint(
        cls,
        path: str | os.PathLike[str],
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        weights: Literal["ema", "raw"] = "ema",
        expect_preset: str | None = None,
        compile: bool | str = False,
        base: str | os.PathLike[str] | None = None,
    ) -> InferenceModel:
        """Load a checkpoint; EMA weights by default, as the official inference does.

        A `light` avatar checkpoint holds only the tensors fine-tuning changed: pass the
        shared checkpoint it was tuned from as `base`, and its tensors fill in the rest.
        """
        ckpt = load_checkpoint(path, expect_preset=expect_preset)
        state = ckpt.weights(weights)
        if base is not None:
            base_ckpt = load_checkpoint(base, expect_preset=ckpt.config.name)
            state = {**base_ckpt.weights(weights), **state}
        reenactor = instantiate(Reenactor, ckpt.config, state, f"{path} ({weights} weights)")
        return cls(reenactor, device, dtype, compile, ckpt.avatar_identity(weights))

    # --- public API ----------------------------------------------------------------------
    @torch.inference_mode()
    def embed_identity(self, images: torch.Tensor) -> torch.Tensor:
        """(K, 3, H, W) photos of one person -> (identity_dim,) mean embedding."""
        x = self._prepare(images)
        with self._autocast():
            return self.net.embed_identity(x[None]).float()[0]

    @torch.inference_mode()
    def encode_pose(self, frames: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) driver crops -> (N, pose_dim) latent pose descriptors."""
        if self.keypoints:
            raise ValueError(
                "this checkpoint is the keypoints baseline (pose_source 'keypoints'): it is "
                "driven by landmarks, use encode_pose_keypoints"
            )
        x = self._prepare(frames)
        with self._autocast():
            self._graph_step()
            return self._owned(self._pose(x).float())

    @torch.inference_mode()
    def encode_pose_keypoints(self, points: torch.Tensor) -> torch.Tensor:
        """(N, L, 2) driver landmarks in [0, 1] crop coordinates -> (N, pose_dim) (FSTH+)."""
        if not self.keypoints:
            raise ValueError("this checkpoint encodes pose from images: use encode_pose")
        shape = (self.config.num_keypoints, 2)
        if points.dim() != 3 or tuple(points.shape[1:]) != shape or points.shape[0] == 0:
            raise ValueError(f"keypoints must be (N>=1, {shape[0]}, 2), got {tuple(points.shape)}")
        x = points.to(self.device, torch.float32)
        if not torch.isfinite(x).all():
            raise ValueError("keypoints must be finite (NaN marks a frame with no face found)")
        with self._autocast():
            self._graph_step()
            return self._owned(self._pose(x).float())

    @torch.inference_mode()
    def render(
        self, identity: torch.Tensor, poses: torch.Tensor, generator: nn.Module | None = None
    ) -> RenderOutput:
        """Render `identity` (identity_dim,) or (N, identity_dim) in each of N poses.

        `generator` swaps in a fine-tuned avatar's (folded) generator for the shared one.
        """
        poses = poses.to(self.device, torch.float32)
        if poses.dim() != 2 or poses.shape[1] != self.config.pose_dim:
            raise ValueError(f"poses must be (N, {self.config.pose_dim}), got {tuple(poses.shape)}")
        identity = identity.to(self.device, torch.float32)
        if identity.shape[-1] != self.config.identity_dim or identity.dim() > 2:
            raise ValueError(
                f"identity must be ({self.config.identity_dim},) or (N, "
                f"{self.config.identity_dim}), got {tuple(identity.shape)}"
            )
        identity = identity.expand(poses.shape[0], -1) if identity.dim() == 1 else identity
        with self._autocast():
            self._graph_step()
            out = (generator or self._generator)(identity, poses)
        mask = self._owned(out.mask.float())
        return RenderOutput(rgb=(out.rgb.float() * mask).clamp(0, 1), mask=mask.clamp(0, 1))

    def reenact(self, identity: torch.Tensor, frames: torch.Tensor) -> RenderOutput:
        """Drive `identity` with driver crops: encode_pose then render."""
        return self.render(identity, self.encode_pose(frames))

    # --- helpers -------------------------------------------------------------------------
    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        size = self.config.image_size
        if images.dim() != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"images must be (N, 3, {size}, {size}), got {tuple(images.shape)}")
        if images.shape[0] == 0:
            raise ValueError("images must hold at least one frame")
        if images.dtype == torch.uint8:
            return images.to(self.device).float().div_(255)
        if not images.is_floating_point():
            raise ValueError(f"images must be uint8 or floating point, got {images.dtype}")
        return images.to(self.device, torch.float32)

    def _graph_step(self) -> None:
        """CUDA-graph modes reuse output memory: mark each call as a new step."""
        if self._graphs:
            torch.compiler.cudagraph_mark_step_begin()

    def _owned(self, t: torch.Tensor) -> torch.Tensor:
        """A tensor the next CUDA-graph replay cannot overwrite."""
        return t.clone() if self._graphs else t

    def _autocast(self) -> torch.autocast:
        return torch.autocast(
            self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32
        )
