"""Synthetic clips in the clipstore layout, and whole datasets of them.

Each clip is one identity through a sampled pose trajectory, its parameters stored as extras.
`generate` writes every missing clip; the output never depends on the number of workers.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm import tqdm

from training.clipstore import clip_path, write_clip
from training.synthetic.params import (
    BACKGROUNDS,
    DEFAULT_FPS,
    HAIR_STYLES,
    IdentityParams,
    PoseParams,
    identity_for,
    poses_for,
)
from training.synthetic.render import SyntheticFrame, render

GENERATOR_VERSION = 1


# --- clips ---------------------------------------------------------------------------------------
def render_clip(
    identity: IdentityParams, poses: Sequence[PoseParams], size: int
) -> list[SyntheticFrame]:
    """One identity through a pose trajectory."""
    return [render(identity, pose, size) for pose in poses]


def write_synthetic_clip(
    path: Path,
    identity: IdentityParams,
    poses: Sequence[PoseParams],
    size: int,
    fps: float = DEFAULT_FPS,
    meta: dict[str, Any] | None = None,
) -> Path:
    """Render a clip and store it in the clipstore layout, parameters included as extras."""
    frames = render_clip(identity, poses, size)
    n = len(frames)
    return write_clip(
        path,
        images=np.stack([f.image for f in frames]),
        masks=np.stack([f.mask for f in frames]),
        boxes=np.tile(np.array([0.0, 0.0, size, size], np.float32), (n, 1)),
        timestamps=np.arange(n) / fps,
        landmarks=np.stack([f.landmarks for f in frames]),
        extras={
            "identity_params": identity.to_vector(),
            "pose_params": np.stack([pose.to_vector() for pose in poses]),
        },
        meta={
            "source": "synthetic",
            "generator": "training.synthetic",
            "generator_version": GENERATOR_VERSION,
            "fps": fps,
            "landmark_scheme": "ibug68",
            "identity_param_names": list(IdentityParams.names()),
            "pose_param_names": list(PoseParams.names()),
            "hair_style": HAIR_STYLES[identity.hair_style],
            "background": BACKGROUNDS[identity.background],
            **(meta or {}),
        },
    )


# --- datasets ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SynthConfig:
    """What the CLI generates; the output depends on these, never on the number of workers."""

    out: Path
    identities: int
    clips: int
    frames: int
    size: int
    seed: int = 0
    workers: int = 1
    fps: float = DEFAULT_FPS
    video: str = "synth"
    grid: Path | None = None


def identity_name(index: int) -> str:
    return f"id{index:05d}"


def clip_name(index: int) -> str:
    return f"{index:05d}"


def generate_clip(cfg: SynthConfig, identity: int, clip: int) -> Path:
    """Write clip `clip` of identity `identity` (a pure function of cfg and the indices)."""
    path = clip_path(cfg.out, identity_name(identity), cfg.video, clip_name(clip))
    poses = poses_for(cfg.seed, identity, clip, cfg.frames, cfg.fps)
    meta = {"seed": cfg.seed, "identity_index": identity, "clip_index": clip}
    return write_synthetic_clip(
        path, identity_for(cfg.seed, identity), poses, cfg.size, cfg.fps, meta
    )


def _generate_job(job: tuple[SynthConfig, int, int]) -> Path:
    cv2.setNumThreads(1)
    return generate_clip(*job)


def generate(cfg: SynthConfig) -> int:
    """Write every missing clip of the dataset; returns how many were written."""
    jobs = [
        (cfg, i, c)
        for i in range(cfg.identities)
        for c in range(cfg.clips)
        if not clip_path(cfg.out, identity_name(i), cfg.video, clip_name(c)).exists()
    ]
    total = cfg.identities * cfg.clips
    with tqdm(
        total=total, initial=total - len(jobs), desc="synthetic", unit="clip", file=sys.stderr
    ) as bar:
        if cfg.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                _generate_job(job)
                bar.update()
        else:
            ctx = multiprocessing.get_context("spawn")  # no fork of a process holding threads
            with ctx.Pool(cfg.workers) as pool:
                for _ in pool.imap_unordered(_generate_job, jobs):
                    bar.update()
    return len(jobs)
