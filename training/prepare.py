"""`python -m training.prepare SRC DST`: a VoxCeleb2-style tree of videos
(SRC/idXXXXX/<video>/<clip>.mp4) -> face crops + foreground masks in the clip store.

Two streaming passes per clip (detect every kept frame, smooth the boxes, then decode again
and crop), so no clip is ever held in memory. Resumable: clips whose output exists are
skipped. Clips that fail are skipped and listed in DST/prepare_report.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from media.crop import crop_face
from media.errors import MediaError, NoFaceError
from media.faces import FaceConfig, FaceDetector
from media.geometry import Box
from media.landmarks import FaceLandmarker
from media.segmentation import ForegroundSegmenter
from media.smoothing import fill_gaps, smooth_boxes
from media.video import read_frames
from training.clipstore import ClipStoreError, clip_path, write_clip

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}
REPORT = "prepare_report.json"


@dataclass(frozen=True)
class PrepareConfig:
    size: int = 256
    every: int = 1  # keep one of every N frames (the paper used 1 in 25 on VoxCeleb2)
    max_frames: int | None = None  # per clip, after subsampling
    smooth: bool = True  # One Euro smoothing of the crop boxes along the clip
    landmarks: bool = False  # also store 468 face-mesh points per crop
    face: FaceConfig = field(default_factory=FaceConfig)


@dataclass(frozen=True)
class SourceClip:
    identity: str
    video: str
    clip: str
    path: Path


def find_clips(src: str | Path) -> list[SourceClip]:
    """Every SRC/<identity>/<video>/<clip>.<video suffix>, sorted."""
    found = [
        SourceClip(p.parent.parent.name, p.parent.name, p.stem, p)
        for p in Path(src).glob("*/*/*")
        if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file()
    ]
    return sorted(found, key=lambda c: (c.identity, c.video, c.clip))


class Preprocessor:
    """Per-process mediapipe graphs and the per-clip pipeline."""

    def __init__(self, config: PrepareConfig):
        self.config = config
        self.detector = FaceDetector(config.face)
        self.segmenter = ForegroundSegmenter()
        self.landmarker = FaceLandmarker() if config.landmarks else None

    def _kept(self, path: Path) -> Any:
        cfg = self.config
        kept = 0
        for frame in read_frames(path):
            if frame.index % cfg.every:
                continue
            yield frame
            kept += 1
            if cfg.max_frames is not None and kept >= cfg.max_frames:
                return

    def process(self, clip: SourceClip, dst: Path) -> int:
        """Write one clip's crops; return its frame count."""
        cfg = self.config
        boxes: list[Box | None] = []
        times: list[float] = []
        for frame in self._kept(clip.path):  # pass 1: detect
            faces = self.detector.detect(frame.image)
            boxes.append(
                self.detector.select(faces).box.square(cfg.face.box_scale) if faces else None
            )
            times.append(frame.time)
        if not any(boxes):
            raise NoFaceError(f"{clip.path.name}: no face in any of {len(boxes)} frames")
        track = smooth_boxes(boxes, times) if cfg.smooth else fill_gaps(boxes)
        crops, masks, points = [], [], []
        for frame, box in zip(self._kept(clip.path), track, strict=False):  # pass 2: crop
            crop = crop_face(frame.image, box, cfg.size)
            crops.append(crop.image)
            masks.append((self.segmenter.segment(crop.image) * 255).round().astype(np.uint8))
            if self.landmarker is not None:
                found = self.landmarker.landmarks(crop.image)
                points.append(found[0] if found else np.full((468, 2), np.nan, np.float32))
        write_clip(
            dst,
            images=np.stack(crops),
            masks=np.stack(masks),
            boxes=np.stack([b.as_array() for b in track[: len(crops)]]),
            timestamps=np.asarray(times[: len(crops)], np.float64),
            landmarks=np.stack(points) if points else None,
            meta={"source": "video", "source_path": str(clip.path), "every": cfg.every},
        )
        return len(crops)


_WORKER: Preprocessor | None = None


def _init_worker(config: PrepareConfig) -> None:
    global _WORKER
    _WORKER = Preprocessor(config)


def _run_one(job: tuple[SourceClip, Path]) -> dict[str, Any]:
    clip, dst = job
    assert _WORKER is not None
    try:
        frames = _WORKER.process(clip, dst)
        return {"clip": str(clip.path), "ok": True, "frames": frames}
    except (MediaError, ClipStoreError, ValueError) as exc:
        code = getattr(exc, "code", "invalid_clip")
        return {"clip": str(clip.path), "ok": False, "code": code, "message": str(exc)}


def prepare(src: str | Path, dst: str | Path, config: PrepareConfig, workers: int = 1) -> dict:
    """Preprocess every clip not yet in DST; return (and write) the report."""
    dst = Path(dst)
    clips = find_clips(src)
    jobs = [(c, clip_path(dst, c.identity, c.video, c.clip)) for c in clips]
    todo = [(c, out) for c, out in jobs if not out.exists()]
    results: list[dict[str, Any]] = []
    bar = tqdm(total=len(todo), desc="prepare", unit="clip", file=sys.stderr)
    if workers <= 1:
        _init_worker(config)
        for job in todo:
            results.append(_run_one(job))
            bar.update()
    else:
        with mp.get_context("spawn").Pool(workers, _init_worker, (config,)) as pool:
            for result in pool.imap_unordered(_run_one, todo):
                results.append(result)
                bar.update()
    bar.close()
    report = {
        "source": str(src),
        "config": asdict(config),
        "clips_found": len(clips),
        "skipped_existing": len(clips) - len(todo),
        "prepared": sum(r["ok"] for r in results),
        "frames": sum(r.get("frames", 0) for r in results),
        "failed": sorted((r for r in results if not r["ok"]), key=lambda r: r["clip"]),
    }
    _write_json(dst / REPORT, report)
    return report


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path, help="SRC/<identity>/<video>/<clip>.mp4 tree")
    parser.add_argument("dst", type=Path, help="output clip store")
    parser.add_argument("--size", type=int, default=256, help="crop resolution")
    parser.add_argument("--every", type=int, default=1, help="keep 1 of every N frames")
    parser.add_argument("--max-frames", type=int, default=None, help="per clip")
    parser.add_argument("--no-smooth", action="store_true", help="use raw per-frame boxes")
    parser.add_argument("--landmarks", action="store_true", help="store face-mesh points")
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args(argv)
    if not args.src.is_dir():
        parser.error(f"{args.src} is not a directory")
    config = PrepareConfig(
        size=args.size,
        every=args.every,
        max_frames=args.max_frames,
        smooth=not args.no_smooth,
        landmarks=args.landmarks,
    )
    report = prepare(args.src, args.dst, config, workers=args.workers)
    print(
        f"{report['prepared']} clips prepared ({report['frames']} frames), "
        f"{report['skipped_existing']} already done, {len(report['failed'])} failed; "
        f"report: {args.dst / REPORT}"
    )
    for failure in report["failed"]:
        print(f"  skipped {failure['clip']}: [{failure['code']}] {failure['message']}")
    return (
        1 if report["clips_found"] and not (report["prepared"] or report["skipped_existing"]) else 0
    )


if __name__ == "__main__":
    sys.exit(main())
