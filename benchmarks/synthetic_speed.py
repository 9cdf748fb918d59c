"""Synthetic talking-head throughput (frames/s) on one core, per image size.

Run from the repo root: `python -m benchmarks.synthetic_speed --help`. JSON goes to stdout
(and --out). `render` is the renderer alone; `render_encode` adds the JPEG encoding of a clip.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks.report import cpu_name, emit
from training.clipstore import JPEG_QUALITY
from training.synthetic import identity_for, poses_for, render

NUM_IDENTITIES = 8  # frames cycle through these, so per-identity caches do not flatter the result


@dataclass(frozen=True)
class BenchConfig:
    """Everything the CLI sets."""

    sizes: tuple[int, ...] = (64, 128, 256)
    frames: int = 200
    warmup: int = 5
    seed: int = 0
    out: Path | None = None


def parse_args(argv: list[str] | None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m benchmarks.synthetic_speed", description=__doc__)
    p.add_argument("--sizes", default="64,128,256", help="comma list of image sizes")
    p.add_argument("--frames", type=int, default=200, help="timed frames per size")
    p.add_argument("--warmup", type=int, default=5, help="untimed frames per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    a = p.parse_args(argv)
    try:
        sizes = tuple(int(s) for s in a.sizes.split(",") if s.strip())
    except ValueError:
        p.error(f"--sizes must be integers, got {a.sizes!r}")
    if not sizes or min(sizes) < 16:
        p.error("--sizes must be integers >= 16")
    if a.frames < 1 or a.warmup < 0:
        p.error("need --frames >= 1 and --warmup >= 0")
    return BenchConfig(sizes=sizes, frames=a.frames, warmup=a.warmup, seed=a.seed, out=a.out)


def frames_per_s(step: Callable[[int], Any], cfg: BenchConfig) -> dict[str, float]:
    for k in range(cfg.warmup):
        step(k)
    start = time.perf_counter()
    for k in range(cfg.frames):
        step(k)
    seconds = time.perf_counter() - start
    return {"frames_per_s": cfg.frames / seconds, "ms_per_frame": 1e3 * seconds / cfg.frames}


def bench_size(size: int, cfg: BenchConfig) -> dict[str, Any]:
    identities = [identity_for(cfg.seed, i) for i in range(NUM_IDENTITIES)]
    poses = poses_for(cfg.seed, 0, 0, cfg.warmup + cfg.frames)
    params = [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]

    def draw(k: int) -> None:
        render(identities[k % NUM_IDENTITIES], poses[k], size)

    def draw_and_encode(k: int) -> None:
        frame = render(identities[k % NUM_IDENTITIES], poses[k], size)
        cv2.imencode(".jpg", cv2.cvtColor(frame.image, cv2.COLOR_RGB2BGR), params)

    return {
        "size": size,
        "frames": cfg.frames,
        "render": frames_per_s(draw, cfg),
        "render_encode": frames_per_s(draw_and_encode, cfg),
    }


def run_benchmark(cfg: BenchConfig) -> dict[str, Any]:
    cv2.setNumThreads(1)  # one core, as one generator worker runs
    return {
        "benchmark": "synthetic_speed",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "opencv": cv2.__version__,
        "cpu": cpu_name(),
        "threads": 1,
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "results": [bench_size(size, cfg) for size in cfg.sizes],
    }


def summary_table(report: dict[str, Any]) -> str:
    lines = [f"{'size':>6}{'render f/s':>14}{'+jpeg f/s':>14}"]
    for row in report["results"]:
        render_fps = row["render"]["frames_per_s"]
        encode_fps = row["render_encode"]["frames_per_s"]
        lines.append(f"{row['size']:>6}{render_fps:>14.1f}{encode_fps:>14.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    report = run_benchmark(cfg)
    emit(report, cfg.out, summary_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
