"""Temporal smoothing of face crop boxes with the One Euro filter (Casiez et al., CHI 2012).

Reenactment is only smooth when the crop is (paper, Section 4): per-frame detections jitter
by a few pixels, which the generator would reproduce as head shake. The One Euro filter
smooths hard when the head is still and follows quickly when it moves. Missed detections
hold the last box; a jump larger than `cut_threshold` box sides (a scene cut) restarts it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from media.geometry import Box


@dataclass(frozen=True)
class SmoothingConfig:
    min_cutoff: float = 1.0  # Hz: cutoff at rest (lower = smoother, more lag)
    beta: float = 1.0  # cutoff increase per (box sides / s) of speed
    d_cutoff: float = 1.0  # Hz: cutoff of the speed estimate
    cut_threshold: float = 0.5  # centre jump, in box sides, treated as a scene cut
    cut_scale_ratio: float = 1.5  # size change treated as a scene cut


class OneEuroFilter:
    """Vector One Euro filter; speed is measured in units of `scale` per second."""

    def __init__(self, config: SmoothingConfig):
        self.config = config
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    @staticmethod
    def _alpha(cutoff: float, dt: float) -> float:
        tau = 1.0 / (2 * math.pi * cutoff)
        return 1.0 / (1.0 + tau / dt)

    def __call__(self, x: np.ndarray, t: float, scale: float = 1.0) -> np.ndarray:
        if self._x is None or self._dx is None or t <= self._t:
            self._x, self._dx, self._t = x.astype(np.float64), np.zeros_like(x, np.float64), t
            return self._x.copy()
        cfg, dt = self.config, t - self._t
        dx = (x - self._x) / dt
        a_d = self._alpha(cfg.d_cutoff, dt)
        self._dx = a_d * dx + (1 - a_d) * self._dx
        speed = float(np.linalg.norm(self._dx)) / scale
        a = self._alpha(cfg.min_cutoff + cfg.beta * speed, dt)
        self._x = a * x + (1 - a) * self._x
        self._t = t
        return self._x.copy()


class BoxSmoother:
    """Streaming smoother: feed one detection (or None) per frame, get a box back."""

    def __init__(self, config: SmoothingConfig | None = None):
        self.config = config or SmoothingConfig()
        self._filter = OneEuroFilter(self.config)
        self._last: np.ndarray | None = None  # (cx, cy, side)

    def update(self, box: Box | None, t: float) -> Box | None:
        if box is None:  # missed detection: hold the last box
            return None if self._last is None else Box.from_center(*self._last)
        state = np.array([*box.center, max(box.width, box.height)])
        if self._last is not None and self._is_cut(state):
            self._filter.reset()
        self._last = self._filter(state, t, scale=state[2])
        return Box.from_center(*self._last)

    def _is_cut(self, state: np.ndarray) -> bool:
        assert self._last is not None
        side = self._last[2]
        jump = float(np.linalg.norm(state[:2] - self._last[:2])) / side
        ratio = max(state[2], side) / max(min(state[2], side), 1e-6)
        return jump > self.config.cut_threshold or ratio > self.config.cut_scale_ratio


def smooth_boxes(
    boxes: Sequence[Box | None], times: Sequence[float], config: SmoothingConfig | None = None
) -> list[Box]:
    """Smooth a whole track; frames before the first detection take the first box."""
    if len(boxes) != len(times):
        raise ValueError("boxes and times differ in length")
    first = next((b for b in boxes if b is not None), None)
    if first is None:
        raise ValueError("no detection in the whole track")
    smoother = BoxSmoother(config)
    out = [smoother.update(b, t) for b, t in zip(boxes, times, strict=True)]
    return [first if b is None else b for b in out]


def fill_gaps(boxes: Sequence[Box | None]) -> list[Box]:
    """No smoothing: hold the last box through misses; leading misses take the first."""
    first = next((b for b in boxes if b is not None), None)
    if first is None:
        raise ValueError("no detection in the whole track")
    out, last = [], first
    for box in boxes:
        last = box or last
        out.append(last)
    return out


def box_jitter(boxes: Sequence[Box]) -> float:
    """Mean |second difference| of (cx, cy, side), in units of the mean box side.

    Zero for boxes moving at constant speed; detection noise shows up directly.
    """
    state = np.array([[*b.center, max(b.width, b.height)] for b in boxes], dtype=np.float64)
    if len(state) < 3:
        return 0.0
    accel = state[2:] - 2 * state[1:-1] + state[:-2]
    return float(np.abs(accel).mean() / state[:, 2].mean())
