"""A picture of synthetic samples: identities in fixed poses, then cross-person ground truth."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from training.synthetic.params import PoseParams, identity_for, poses_for
from training.synthetic.render import render

GRID_POSES = (
    PoseParams(),
    PoseParams(yaw=-0.5, mouth_open=0.8),
    PoseParams(yaw=0.5, smile=1.0),
    PoseParams(pitch=0.28, brow_raise=1.0, mouth_open=0.4),
    PoseParams(pitch=-0.25, roll=0.15, blink_left=1.0, blink_right=1.0),
    PoseParams(yaw=0.3, roll=-0.18, blink_left=1.0, smile=0.6, brow_raise=-1.0),
)


def render_grid(seed: int, num_identities: int, size: int) -> np.ndarray:
    """RGB grid: one row per identity over GRID_POSES, then identity A in other people's poses.

    The last row alternates a driver (identity B_k in a random pose) with identity 0 rendered
    in that same pose: the ground truth a cross-person reenactment should produce.
    """
    rows = [
        np.concatenate([render(identity_for(seed, i), pose, size).image for pose in GRID_POSES], 1)
        for i in range(num_identities)
    ]
    source = identity_for(seed, 0)
    demo = []
    for k in range(len(GRID_POSES) // 2):
        driver = identity_for(seed, k + 1)
        # the liveliest frame of the driver's own clip, so the demo shows a clear pose
        trajectory = poses_for(seed, k + 1, 0, 100)
        pose = max(trajectory, key=lambda q: abs(q.yaw) + abs(q.pitch) + 0.3 * q.mouth_open)
        demo += [
            _label(render(driver, pose, size).image, "B"),
            _label(render(source, pose, size).image, "A<-B"),
        ]
    gap = np.full((max(2, size // 32), size * len(GRID_POSES), 3), 255, np.uint8)
    return np.concatenate([*rows, gap, np.concatenate(demo, 1)], 0)


def _label(tile: np.ndarray, text: str) -> np.ndarray:
    """Small outlined caption in the top-left corner."""
    size = tile.shape[0]
    origin, scale = (max(2, size // 40), max(10, size // 12)), size / 320
    for color, width in (
        ((255, 255, 255), max(1, size // 64) + 1),
        ((0, 0, 0), max(1, size // 128)),
    ):
        cv2.putText(tile, text, origin, cv2.FONT_HERSHEY_SIMPLEX, scale, color, width, cv2.LINE_AA)
    return tile


def write_grid(path: Path, seed: int, num_identities: int, size: int) -> Path:
    """Save `render_grid` as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = cv2.cvtColor(render_grid(seed, num_identities, size), cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), grid, [cv2.IMWRITE_PNG_COMPRESSION, 9]):
        raise OSError(f"could not write {path}")
    return path
