"""Who a synthetic person is and how they move: parameter dataclasses, vectors and sampling.

Parameters flatten to float32 vectors (training targets and clip extras). Sampling is keyed by
(seed, identity, clip), so an identity or clip does not depend on how many others are generated.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Self, cast

import numpy as np

RGB = tuple[float, float, float]  # 0..1
HAIR_STYLES = ("bald", "short", "long", "bangs", "curly")
BACKGROUNDS = ("solid", "vertical", "diagonal", "stripes", "dots")
DEFAULT_FPS = 25.0


# --- parameters ----------------------------------------------------------------------------------
class _Vector:
    """Flattens a frozen dataclass of floats, ints, bools and RGB triples to float32 and back."""

    @classmethod
    def names(cls) -> tuple[str, ...]:
        names: list[str] = []
        for f in fields(cast(Any, cls)):
            names += [f"{f.name}_{c}" for c in "rgb"] if isinstance(f.default, tuple) else [f.name]
        return tuple(names)

    def to_vector(self) -> np.ndarray:
        values: list[float] = []
        for f in fields(cast(Any, self)):
            value = getattr(self, f.name)
            values += list(value) if isinstance(value, tuple) else [float(value)]
        return np.asarray(values, np.float32)

    @classmethod
    def from_vector(cls, vector: np.ndarray | Sequence[float]) -> Self:
        values = [float(v) for v in np.asarray(vector).reshape(-1)]
        if len(values) != len(cls.names()):
            raise ValueError(f"{cls.__name__} needs {len(cls.names())} values, got {len(values)}")
        kwargs: dict[str, Any] = {}
        for f in fields(cast(Any, cls)):
            if isinstance(f.default, tuple):
                kwargs[f.name], values = tuple(values[:3]), values[3:]
                continue
            value, values = values[0], values[1:]
            if isinstance(f.default, bool):
                kwargs[f.name] = value >= 0.5
            elif isinstance(f.default, int):
                kwargs[f.name] = round(value)
            else:
                kwargs[f.name] = value
        return cls(**kwargs)


@dataclass(frozen=True)
class IdentityParams(_Vector):
    """Who the person is; scalars are normalised to 0..1 and mapped to geometry by the renderer."""

    face_width: float = 0.5
    face_height: float = 0.5
    jaw: float = 0.5  # 0 square jaw .. 1 pointed chin
    skin: RGB = (0.87, 0.69, 0.56)
    hair_style: int = 1  # index into HAIR_STYLES
    hair_color: RGB = (0.25, 0.15, 0.09)
    eye_size: float = 0.5
    eye_spacing: float = 0.5
    iris_color: RGB = (0.40, 0.25, 0.12)
    nose_length: float = 0.5
    nose_width: float = 0.5
    mouth_width: float = 0.5
    lip_color: RGB = (0.75, 0.40, 0.40)
    brow_thickness: float = 0.5
    brow_color: RGB = (0.20, 0.12, 0.08)
    glasses: bool = False
    glasses_color: RGB = (0.10, 0.10, 0.10)
    earrings: bool = False
    earring_color: RGB = (0.90, 0.75, 0.30)
    background: int = 0  # index into BACKGROUNDS
    background_a: RGB = (0.55, 0.65, 0.75)
    background_b: RGB = (0.85, 0.85, 0.80)
    shirt_color: RGB = (0.20, 0.35, 0.60)


@dataclass(frozen=True)
class PoseParams(_Vector):
    """Head pose and expression of one frame; identity-free by construction."""

    yaw: float = 0.0  # radians; > 0 turns the face toward image right
    pitch: float = 0.0  # radians; > 0 looks up
    roll: float = 0.0  # radians; > 0 tilts the head counter-clockwise in the image
    mouth_open: float = 0.0  # 0..1
    smile: float = 0.0  # 0..1
    blink_left: float = 0.0  # 0 open .. 1 closed; the subject's left eye (image right)
    blink_right: float = 0.0
    brow_raise: float = 0.0  # -1 frown .. 1 raised
    tx: float = 0.0  # head offset as a fraction of the image size; > 0 right
    ty: float = 0.0  # > 0 down
    scale: float = 1.0


# --- sampling ------------------------------------------------------------------------------------
_SKIN = np.array(
    [[0.98, 0.85, 0.76], [0.93, 0.76, 0.64], [0.80, 0.60, 0.45], [0.66, 0.45, 0.31],
     [0.47, 0.31, 0.21], [0.32, 0.21, 0.15]]
)  # fmt: skip
_HAIR = np.array(
    [[0.08, 0.07, 0.07], [0.24, 0.15, 0.09], [0.45, 0.30, 0.17], [0.85, 0.70, 0.42],
     [0.62, 0.26, 0.12], [0.62, 0.62, 0.62], [0.90, 0.90, 0.88]]
)  # fmt: skip
_HAIR_P = np.array([0.3, 0.25, 0.15, 0.12, 0.08, 0.06, 0.04])
_IRIS = np.array(
    [[0.40, 0.25, 0.12], [0.20, 0.13, 0.08], [0.30, 0.50, 0.80], [0.30, 0.55, 0.35],
     [0.50, 0.55, 0.60], [0.55, 0.45, 0.20]]
)  # fmt: skip
_METAL = np.array([[0.10, 0.10, 0.10], [0.45, 0.25, 0.12], [0.70, 0.70, 0.75], [0.55, 0.10, 0.15]])
_JEWEL = np.array([[0.95, 0.78, 0.30], [0.80, 0.80, 0.85], [0.85, 0.20, 0.30], [0.20, 0.60, 0.85]])


def sample_identity(rng: np.random.Generator) -> IdentityParams:
    """A random person: palette colours with jitter, uniform shapes, categorical extras."""

    def rgb(base: np.ndarray, jitter: float = 0.03) -> RGB:
        c = np.clip(base + rng.uniform(-jitter, jitter, 3), 0.0, 1.0)
        return (float(c[0]), float(c[1]), float(c[2]))

    def hsv(s: tuple[float, float], v: tuple[float, float]) -> RGB:
        return colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*s), rng.uniform(*v))

    t = rng.uniform(0, len(_SKIN) - 1)
    k = min(int(t), len(_SKIN) - 2)
    skin = _SKIN[k] + (t - k) * (_SKIN[k + 1] - _SKIN[k])
    hair = _HAIR[rng.choice(len(_HAIR), p=_HAIR_P)]
    lip = skin * 0.85 + rng.uniform(0.25, 0.6) * (np.array([0.72, 0.25, 0.30]) - skin * 0.85)
    unit = rng.uniform(size=9)
    return IdentityParams(
        face_width=float(unit[0]),
        face_height=float(unit[1]),
        jaw=float(unit[2]),
        skin=rgb(skin, 0.02),
        hair_style=int(rng.choice(len(HAIR_STYLES), p=[0.12, 0.3, 0.25, 0.18, 0.15])),
        hair_color=rgb(hair),
        eye_size=float(unit[3]),
        eye_spacing=float(unit[4]),
        iris_color=rgb(_IRIS[rng.integers(len(_IRIS))]),
        nose_length=float(unit[5]),
        nose_width=float(unit[6]),
        mouth_width=float(unit[7]),
        lip_color=rgb(lip, 0.02),
        brow_thickness=float(unit[8]),
        brow_color=rgb(hair * 0.75 if hair.mean() < 0.6 else hair * 0.6),
        glasses=bool(rng.uniform() < 0.3),
        glasses_color=rgb(_METAL[rng.integers(len(_METAL))]),
        earrings=bool(rng.uniform() < 0.3),
        earring_color=rgb(_JEWEL[rng.integers(len(_JEWEL))]),
        background=int(rng.integers(len(BACKGROUNDS))),
        background_a=hsv((0.15, 0.6), (0.35, 0.9)),
        background_b=hsv((0.1, 0.5), (0.5, 0.95)),
        shirt_color=hsv((0.2, 0.8), (0.2, 0.85)),
    )


def sample_poses(
    rng: np.random.Generator, num_frames: int, fps: float = DEFAULT_FPS
) -> list[PoseParams]:
    """A smooth random talking-head trajectory: sums of slow sinusoids, syllables and blinks."""
    t = np.arange(num_frames) / fps

    def wave(amplitude: float, f_lo: float, f_hi: float, n: int = 3) -> np.ndarray:
        weights = rng.uniform(0.5, 1.0, n)
        freqs, phases = rng.uniform(f_lo, f_hi, n), rng.uniform(0, 2 * math.pi, n)
        waves = weights[:, None] * np.sin(2 * math.pi * freqs[:, None] * t + phases[:, None])
        return amplitude * waves.sum(0) / weights.sum()

    yaw = np.clip(rng.uniform(-0.2, 0.2) + wave(0.45, 0.05, 0.4), -0.6, 0.6)
    pitch = np.clip(rng.uniform(-0.08, 0.08) + wave(0.2, 0.05, 0.4), -0.3, 0.3)
    roll = np.clip(wave(0.14, 0.05, 0.3), -0.2, 0.2)
    talking = np.clip(0.6 + wave(0.9, 0.03, 0.15), 0.0, 1.0)
    syllables = np.clip(0.5 + 0.7 * wave(1.0, 2.0, 5.0, 2), 0.0, 1.0)
    mouth = np.clip(talking * syllables, 0.0, 1.0)
    smile = np.clip(rng.uniform(0.0, 0.5) + wave(0.4, 0.03, 0.15), 0.0, 1.0)
    brow = np.clip(wave(0.6, 0.1, 0.5), -1.0, 1.0)
    tx, ty = wave(0.03, 0.03, 0.2), wave(0.02, 0.03, 0.2)
    scale = 1.0 + wave(0.05, 0.02, 0.1)

    blink_l, blink_r = np.zeros(num_frames), np.zeros(num_frames)
    start = rng.uniform(0.0, 3.0)
    while start < num_frames / fps:
        duration = rng.uniform(0.15, 0.3)
        bump = np.sin(math.pi * np.clip((t - start) / duration, 0.0, 1.0))
        side = rng.uniform()  # 10% of blinks are winks
        if side > 0.05:
            blink_l = np.maximum(blink_l, bump)
        if side < 0.05 or side > 0.1:
            blink_r = np.maximum(blink_r, bump)
        start += duration + rng.exponential(3.0)

    columns = (yaw, pitch, roll, mouth, smile, blink_l, blink_r, brow, tx, ty, scale)
    return [PoseParams(*(float(c[i]) for c in columns)) for i in range(num_frames)]


def identity_for(seed: int, index: int) -> IdentityParams:
    """Identity `index` of a dataset; independent of how many identities are generated."""
    return sample_identity(np.random.default_rng([seed, index]))


def poses_for(
    seed: int, index: int, clip: int, num_frames: int, fps: float = DEFAULT_FPS
) -> list[PoseParams]:
    """Pose trajectory of clip `clip` of identity `index`."""
    return sample_poses(np.random.default_rng([seed, index, clip, 1]), num_frames, fps)
