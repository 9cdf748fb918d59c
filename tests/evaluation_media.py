"""Real faces for the evaluation tests: two photographed people, moved by small head motions.

The photos ship with installed packages (scikit-image's astronaut, Eileen Collins; matplotlib's
Grace Hopper), so nothing is downloaded. Head motion is a smooth rotation, scale and shift of
the photo about the face, encoded as real H.264 clips in the VoxCeleb2 layout.
"""

from __future__ import annotations

import math
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from matplotlib import cbook
from PIL import Image

from media.crop import crop_face
from media.faces import FaceDetector
from tests.media_samples import astronaut, encode_clip

FRAME = 256  # clip resolution
FACE = 90  # face width in the clip, pixels


@cache
def _people() -> dict[str, tuple[np.ndarray, tuple[float, float], float]]:
    """Photo, face centre and face size (pixels), from the same detector the suite uses."""
    with Image.open(str(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))) as image:
        hopper = np.asarray(image.convert("RGB"))
    detector = FaceDetector()
    try:
        found = {}
        for name, photo in (("astronaut", astronaut()), ("hopper", hopper)):
            box = detector.select(detector.detect(photo)).box
            found[name] = (photo, box.center, box.width)
        return found
    finally:
        detector.close()


def head_motion(person: str, n: int, phase: float = 0.0) -> list[np.ndarray]:
    """n (FRAME, FRAME, 3) frames: the head turns (roll +-5 deg), nods in scale and drifts."""
    photo, (cx, cy), face = _people()[person]
    frames = []
    for t in range(n):
        a = 2 * math.pi * t / max(n, 1) + phase
        m = cv2.getRotationMatrix2D(
            (cx, cy), 5 * math.sin(a), FACE / face * (1 + 0.04 * math.cos(a))
        )
        shift = (FRAME / 2 + 6 * math.sin(a) - cx, FRAME / 2 + 4 * math.cos(a) - cy)
        m = np.asarray(m, np.float64) + np.array([[0, 0, shift[0]], [0, 0, shift[1]]])
        size = (FRAME, FRAME)
        frames.append(cv2.warpAffine(photo, m, size, borderMode=cv2.BORDER_REFLECT_101))
    return frames


def write_people(root: Path, frames: int) -> Path:
    """ROOT/<identity>/<video>/<clip>.mp4 for both people, `frames` frames each."""
    for person in ("astronaut", "hopper"):
        clip = root / f"id_{person}" / "video1" / "00001.mp4"
        clip.parent.mkdir(parents=True, exist_ok=True)
        encode_clip(clip, head_motion(person, frames))
    return root


def face_crops(size: int) -> dict[str, np.ndarray]:
    """The suite's crops (official box x 1.8) of each person, and of the astronaut moved."""
    detector = FaceDetector()
    try:
        frames = {
            "astronaut": head_motion("astronaut", 1)[0],
            "astronaut_moved": head_motion("astronaut", 4, phase=1.0)[1],
            "hopper": head_motion("hopper", 1)[0],
        }
        return {
            name: crop_face(frame, detector.crop_box(frame), size).image
            for name, frame in frames.items()
        }
    finally:
        detector.close()
