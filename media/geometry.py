"""Boxes and the crop <-> frame transform shared by cropping, smoothing and paste-back."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Box:
    """Axis-aligned box in frame pixels: (x0, y0) top-left, (x1, y1) bottom-right."""

    x0: float
    y0: float
    x1: float
    y1: float

    @property
    def width(self) -> float:
        return self.x1 - self.x0

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @classmethod
    def from_center(cls, cx: float, cy: float, side: float) -> Box:
        return cls(cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)

    def square(self, scale: float = 1.0) -> Box:
        """Square box on the same centre, side = scale x the longer side (official x1.8)."""
        return Box.from_center(*self.center, max(self.width, self.height) * scale)

    def as_array(self) -> np.ndarray:
        return np.array([self.x0, self.y0, self.x1, self.y1], dtype=np.float32)


@dataclass(frozen=True)
class CropTransform:
    """Integer square window (x0, y0, side) of a frame resized to size x size."""

    x0: int
    y0: int
    side: int
    size: int

    @classmethod
    def from_box(cls, box: Box, size: int) -> CropTransform:
        side = max(1, round(max(box.width, box.height)))
        cx, cy = box.center
        return cls(round(cx - side / 2), round(cy - side / 2), side, size)

    @property
    def scale(self) -> float:
        """Frame pixels per crop pixel."""
        return self.side / self.size

    def crop_to_frame_matrix(self) -> np.ndarray:
        """2x3 affine for cv2.warpAffine, pixel centres aligned like cv2.resize."""
        s = self.scale
        return np.array(
            [[s, 0, self.x0 + 0.5 * s - 0.5], [0, s, self.y0 + 0.5 * s - 0.5]], dtype=np.float64
        )

    def to_frame(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) crop pixel coordinates -> frame pixel coordinates."""
        m = self.crop_to_frame_matrix()
        return points @ m[:, :2].T + m[:, 2]

    def to_crop(self, points: np.ndarray) -> np.ndarray:
        """(N, 2) frame pixel coordinates -> crop pixel coordinates."""
        m = self.crop_to_frame_matrix()
        return (points - m[:, 2]) / self.scale
