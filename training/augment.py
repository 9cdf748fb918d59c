"""Pose-input augmentation from the official code (reference section 10), on uint8 RGB.

The official code used imgaug: SomeOf(0-5) appearance changes and, with p 0.5, an
independent x/y rescale, in random order, on the pose input only; then one shared +-5%
shift of pose input, target and mask. It is built on OpenCV primitives because
albumentations' required opencv-python-headless would overwrite mediapipe's OpenCV.
Ranges the facts leave open follow imgaug's documented example pipeline; the edge-detect
blend uses a uniform alpha rather than imgaug's simplex-noise mask.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np

Image = np.ndarray  # (H, W, 3) uint8 RGB
Points = np.ndarray  # (L, 2) float32 pixel (x, y)
Rng = np.random.Generator


@dataclass(frozen=True)
class PoseAugmentConfig:
    enabled: bool = True
    max_appearance_ops: int = 5
    scale_p: float = 0.5
    scale_range: tuple[float, float] = (0.8, 1.2)
    shift_p: float = 0.5
    shift_fraction: float = 0.05
    elastic_p: float = 0.5


# --- appearance operations (each picks its own random strength) ----------------------------
def _blend_kernel(image: Image, effect: np.ndarray, alpha: float) -> Image:
    identity = np.zeros((3, 3), np.float32)
    identity[1, 1] = 1
    kernel = (1 - alpha) * identity + alpha * effect
    return cv2.filter2D(image, -1, kernel, borderType=cv2.BORDER_REFLECT_101)


def blur(image: Image, rng: Rng) -> Image:
    kind = rng.integers(3)
    if kind == 0:
        return cv2.GaussianBlur(image, (0, 0), sigmaX=max(rng.uniform(0, 1), 1e-3))
    if kind == 1:
        k = int(rng.integers(2, 4))
        return cv2.blur(image, (k, k))
    return cv2.medianBlur(image, 3)


def sharpen(image: Image, rng: Rng) -> Image:
    lightness = rng.uniform(0.75, 1.5)
    effect = np.full((3, 3), -1, np.float32)
    effect[1, 1] = 8 + lightness
    return _blend_kernel(image, effect, rng.uniform(0, 1))


def emboss(image: Image, rng: Rng) -> Image:
    s = rng.uniform(0, 2)
    effect = np.array([[-1 - s, -s, 0], [-s, 1, s], [0, s, 1 + s]], np.float32)
    return _blend_kernel(image, effect, rng.uniform(0, 1))


def edge_detect(image: Image, rng: Rng) -> Image:
    effect = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32)
    return _blend_kernel(image, effect, rng.uniform(0, 0.15))


def gaussian_noise(image: Image, rng: Rng) -> Image:
    noise = rng.normal(0, rng.uniform(0, 0.05 * 255), image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def add(image: Image, rng: Rng) -> Image:
    shape = (1, 1, 3) if rng.random() < 0.5 else (1, 1, 1)  # per channel half the time
    return np.clip(image + rng.uniform(-10, 10, shape), 0, 255).astype(np.uint8)


def saturation(image: Image, rng: Rng) -> Image:
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] = np.clip(hsv[..., 1] + rng.uniform(-20, 20), 0, 255)
    return cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)


def jpeg(image: Image, rng: Rng) -> Image:
    quality = int(rng.integers(70, 100))
    ok, data = cv2.imencode(".jpg", image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok, "JPEG encoding failed"
    return np.ascontiguousarray(cv2.imdecode(data, cv2.IMREAD_COLOR)[..., ::-1])


def multiply(image: Image, rng: Rng) -> Image:
    shape = (1, 1, 3) if rng.random() < 0.5 else (1, 1, 1)
    return np.clip(image * rng.uniform(0.5, 1.5, shape), 0, 255).astype(np.uint8)


def contrast(image: Image, rng: Rng) -> Image:
    x = image.astype(np.float32) / 255
    if rng.random() < 0.5:  # linear around mid-grey
        y = 0.5 + rng.uniform(0.5, 2.0) * (x - 0.5)
    else:  # sigmoid
        y = 1 / (1 + np.exp(rng.uniform(3, 10) * (rng.uniform(0.4, 0.6) - x)))
    return np.clip(y * 255, 0, 255).astype(np.uint8)


def elastic(image: Image, rng: Rng, p: float = 0.5) -> Image:
    if rng.random() >= p:
        return image
    h, w = image.shape[:2]
    alpha, sigma = rng.uniform(0.5, 3.5), 0.25
    dx = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) * alpha
    dy = cv2.GaussianBlur(rng.uniform(-1, 1, (h, w)).astype(np.float32), (0, 0), sigma) * alpha
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(image, xs + dx, ys + dy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)


APPEARANCE_OPS: tuple[Callable[[Image, Rng], Image], ...] = (
    blur, sharpen, emboss, edge_detect, gaussian_noise, add, saturation, jpeg, multiply,
    contrast, elastic,
)  # fmt: skip


# --- geometry --------------------------------------------------------------------------------
def _affine(image: np.ndarray, matrix: np.ndarray, border: int, interp: int) -> np.ndarray:
    h, w = image.shape[:2]
    return cv2.warpAffine(
        image, matrix, (w, h), flags=interp, borderMode=border, borderValue=(0, 0, 0, 0)
    )


def scale_xy(image: Image, sx: float, sy: float) -> Image:
    """Scale x and y independently about the centre (bilinear, reflected border)."""
    h, w = image.shape[:2]
    cx, cy = (w - 1) / 2, (h - 1) / 2
    m = np.array([[sx, 0, cx * (1 - sx)], [0, sy, cy * (1 - sy)]], np.float32)
    return _affine(image, m, cv2.BORDER_REFLECT_101, cv2.INTER_LINEAR)


def shift(image: np.ndarray, dx: float, dy: float, border: int, interp: int) -> np.ndarray:
    m = np.array([[1, 0, dx], [0, 1, dy]], np.float32)
    return _affine(image, m, border, interp)


class PoseAugmenter:
    """Callable augmenting (pose input, target, mask) with the official recipe."""

    def __init__(self, config: PoseAugmentConfig | None = None):
        self.config = config or PoseAugmentConfig()

    def pose_only(self, image: Image, rng: Rng) -> Image:
        """(a) SomeOf(0..max) appearance ops and (b) x/y rescale, in random order."""
        cfg = self.config

        def appearance(x: Image) -> Image:
            n = int(rng.integers(0, cfg.max_appearance_ops + 1))
            for i in rng.permutation(len(APPEARANCE_OPS))[:n]:
                op = APPEARANCE_OPS[i]
                x = op(x, rng) if op is not elastic else elastic(x, rng, cfg.elastic_p)
            return x

        def geometry(x: Image) -> Image:
            if rng.random() >= cfg.scale_p:
                return x
            return scale_xy(x, *rng.uniform(*cfg.scale_range, size=2))

        steps = [appearance, geometry]
        if rng.random() < 0.5:
            steps.reverse()
        for step in steps:
            image = step(image)
        return image

    def __call__(
        self, pose: Image, target: Image, mask: np.ndarray, rng: Rng
    ) -> tuple[Image, Image, np.ndarray]:
        """Augment the pose input alone, then shift all three by one shared draw."""
        pose, target, mask, _ = self.augment(pose, target, mask, rng)
        return pose, target, mask

    def augment(
        self, pose: Image, target: Image, mask: np.ndarray, rng: Rng, points: Points | None = None
    ) -> tuple[Image, Image, np.ndarray, Points | None]:
        """`__call__`, also moving (L, 2) pixel landmarks of the target with the shared shift.

        Landmarks (the keypoints baseline's pose input) get only the shift, which keeps them
        on the target; the appearance and rescale steps belong to the pose image.
        """
        if not self.config.enabled:
            return pose, target, mask, points
        pose = self.pose_only(pose, rng)
        if rng.random() < self.config.shift_p:
            h, w = pose.shape[:2]
            dx, dy = rng.uniform(-1, 1, 2) * self.config.shift_fraction * np.array([w, h])
            pose = shift(pose, dx, dy, cv2.BORDER_REFLECT_101, cv2.INTER_LINEAR)
            target = shift(target, dx, dy, cv2.BORDER_CONSTANT, cv2.INTER_LINEAR)
            mask = shift(mask, dx, dy, cv2.BORDER_CONSTANT, cv2.INTER_LINEAR)
            if points is not None:
                points = points + np.array([dx, dy], np.float32)
        return pose, target, mask, points
