"""Write a synthetic talking-head dataset (clipstore layout) and optionally a grid of samples.

Procedural cartoon heads with known identity and pose stand in for face video datasets, which
cannot be downloaded here: data for CPU training, and ground truth for cross-reenactment.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from training.synthetic.dataset import SynthConfig, generate
from training.synthetic.grid import write_grid
from training.synthetic.params import DEFAULT_FPS


def parse_args(argv: list[str] | None) -> SynthConfig:
    p = argparse.ArgumentParser(prog="python -m training.synthetic", description=__doc__)
    p.add_argument("out", type=Path, help="dataset root: OUT/<identity>/<video>/<clip>.npz")
    p.add_argument("--identities", type=int, default=8)
    p.add_argument("--clips", type=int, default=4, help="clips per identity (0: grid only)")
    p.add_argument("--frames", type=int, default=32, help="frames per clip")
    p.add_argument("--size", type=int, default=128, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1, help="processes; output does not depend on it")
    p.add_argument("--fps", type=float, default=DEFAULT_FPS)
    p.add_argument("--grid", type=Path, default=None, help="also write a PNG grid of samples here")
    a = p.parse_args(argv)
    if a.identities < 1 or a.clips < 0 or a.frames < 1 or a.workers < 1 or a.seed < 0:
        p.error("need --identities >= 1, --clips >= 0, --frames >= 1, --workers >= 1, --seed >= 0")
    if a.size < 16:
        p.error("--size must be at least 16")
    if a.fps <= 0:
        p.error("--fps must be positive")
    return SynthConfig(
        out=a.out, identities=a.identities, clips=a.clips, frames=a.frames, size=a.size,
        seed=a.seed, workers=a.workers, fps=a.fps, grid=a.grid,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    written = generate(cfg)
    total = cfg.identities * cfg.clips
    print(
        f"wrote {written} clips, skipped {total - written} existing, under {cfg.out}",
        file=sys.stderr,
    )
    if cfg.grid is not None:
        write_grid(cfg.grid, cfg.seed, min(cfg.identities, 8), cfg.size)
        print(f"wrote {cfg.grid}", file=sys.stderr)
    return 0
