"""Crop-box jitter before/after One Euro smoothing on a real face clip (JSON to stdout).

The clip pans smoothly over a real photo with per-frame sensor noise, is encoded to H.264
and decoded again, so all jitter in the raw boxes comes from the detector.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.report import emit
from media.faces import FaceDetector
from media.smoothing import SmoothingConfig, box_jitter, smooth_boxes
from media.video import read_frames
from tests.media_samples import encode_clip, panning_frames


def measure(frames: int, noise: float, config: SmoothingConfig) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = encode_clip(Path(tmp) / "pan.mp4", panning_frames(frames, noise=noise), fps=25)
        detector = FaceDetector()
        decoded = list(read_frames(path))
    raw = [detector.select(detector.detect(f.image)).box.square(1.8) for f in decoded]
    smooth = smooth_boxes(raw, [f.time for f in decoded], config)
    before, after = box_jitter(raw), box_jitter(smooth)
    return {"jitter_raw": before, "jitter_smoothed": after, "reduction": before / after}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--noise", type=float, nargs="+", default=[0.0, 3.0, 6.0])
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    config = SmoothingConfig()
    results = [{"noise_std": n, **measure(args.frames, n, config)} for n in args.noise]
    report = {
        "benchmark": "box_jitter",
        "metric": "mean |second difference| of (cx, cy, side) / mean side",
        "frames": args.frames,
        "smoothing": config.__dict__,
        "results": results,
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
