"""Paste-back inverts the crop; backgrounds; box smoothing reduces jitter on a real clip."""

from pathlib import Path

import numpy as np
import pytest

from media.crop import composite, crop_face, paste_back
from media.faces import FaceDetector
from media.geometry import Box, CropTransform
from media.smoothing import BoxSmoother, SmoothingConfig, box_jitter, smooth_boxes
from media.video import read_frames
from tests.media_samples import astronaut, encode_clip, panning_frames


def test_transform_round_trip() -> None:
    t = CropTransform.from_box(Box(100.2, 50.7, 300.2, 250.7), 128)
    points = np.array([[0.0, 0.0], [127.0, 64.0], [13.5, 99.25]])
    np.testing.assert_allclose(t.to_crop(t.to_frame(points)), points, atol=1e-9)


@pytest.mark.parametrize("box", [Box(150, 40, 330, 220), Box(400, -30, 600, 170)])
def test_paste_back_inverts_the_crop(box: Box) -> None:
    frame = astronaut()
    crop = crop_face(frame, box, 256)  # enlarging: little resampling loss
    mask = np.ones((256, 256), np.float32)
    pasted = paste_back(frame, crop.image, mask, crop.transform, feather=0.05)
    t = crop.transform
    x0, y0 = max(t.x0, 0), max(t.y0, 0)
    x1, y1 = min(t.x0 + t.side, 512), min(t.y0 + t.side, 512)
    margin = int(0.1 * t.side)  # inside the feathered rim
    inner = (slice(y0 + margin, y1 - margin), slice(x0 + margin, x1 - margin))
    diff = np.abs(pasted[inner].astype(int) - frame[inner])
    assert diff.mean() < 4
    outside = np.ones((512, 512), bool)
    outside[y0:y1, x0:x1] = False
    np.testing.assert_array_equal(pasted[outside], frame[outside])


def test_paste_back_uses_the_generated_mask() -> None:
    frame = np.full((200, 300, 3), 90, np.uint8)
    t = CropTransform.from_box(Box(100, 50, 200, 150), 64)
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    rgb = np.zeros((64, 64, 3), np.float32)
    rgb[mask > 0] = (1.0, 0.0, 0.0)  # premultiplied red square, black elsewhere
    out = paste_back(frame, rgb, mask, t)
    assert tuple(out[100, 150]) == (255, 0, 0)  # centre of the square
    assert tuple(out[55, 105]) == (90, 90, 90)  # crop corner: mask 0 keeps the driver frame


def test_composite_colour_and_image_backgrounds() -> None:
    mask = np.zeros((4, 4), np.float32)
    mask[:2] = 1
    rgb = np.zeros((4, 4, 3), np.float32)
    rgb[:2] = 0.5
    out = composite(rgb, mask, (0, 255, 0))
    assert tuple(out[0, 0]) == (128, 128, 128) and tuple(out[3, 3]) == (0, 255, 0)
    image = np.full((8, 8, 3), 7, np.uint8)
    assert tuple(composite(rgb, mask, image)[3, 0]) == (7, 7, 7)


def noisy_track(n: int, noise: float, seed: int = 0) -> list[Box]:
    rng = np.random.default_rng(seed)
    return [
        Box.from_center(100 + i + rng.normal(0, noise), 80 + rng.normal(0, noise), 60)
        for i in range(n)
    ]


def test_smoothing_reduces_detector_noise() -> None:
    raw = noisy_track(100, noise=2.0)
    smooth = smooth_boxes(raw, [i / 25 for i in range(100)])
    assert box_jitter(smooth) < box_jitter(raw) / 4
    # and still follows the motion (no large lag on a 1 px/frame pan)
    assert abs(smooth[-1].center[0] - raw[-1].center[0]) < 6


def test_missed_detections_and_scene_cuts() -> None:
    smoother = BoxSmoother(SmoothingConfig())
    assert smoother.update(None, 0.0) is None
    a = smoother.update(Box.from_center(100, 100, 50), 0.04)
    assert smoother.update(None, 0.08) == a  # hold through a miss
    cut = smoother.update(Box.from_center(400, 300, 80), 0.12)
    assert cut is not None and cut.center == (400, 300)  # restarted, not dragged across
    track = smooth_boxes([None, None, Box(0, 0, 10, 10)], [0, 1, 2])
    assert track[0] == Box(0, 0, 10, 10)
    with pytest.raises(ValueError, match="no detection"):
        smooth_boxes([None, None], [0, 1])


def test_jitter_before_and_after_on_a_real_clip(tmp_path: Path) -> None:
    """A real face panning smoothly, encoded and decoded: detections jitter, smoothing fixes it."""
    path = encode_clip(tmp_path / "pan.mp4", panning_frames(40, noise=6.0), fps=25)
    detector = FaceDetector()
    frames = list(read_frames(path))
    raw = [detector.select(detector.detect(f.image)).box.square(1.8) for f in frames]
    smooth = smooth_boxes(raw, [f.time for f in frames])
    before, after = box_jitter(raw), box_jitter(smooth)
    assert after < before / 2, (before, after)
