"""Pose-space control (paper Sec. 4, Fig. 4): the driver's pose is a D-float latent vector
that carries no identity, so poses can be interpolated, retimed and smoothed on their own and
then rendered for any avatar.

Pure numpy. Interpolation follows the descriptor's geometry: its direction moves along the
great circle between two poses and its norm changes linearly (`slerp`), so a halfway pose is
neither shrunk towards zero (as a straight line between far-apart vectors would be) nor
lengthened. Every function takes and returns float32 arrays of shape (T, D).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, Literal

import numpy as np

Method = Literal["slerp", "linear"]
Resample = Literal["slerp", "nearest"]

PARALLEL_EPS: Final = 1e-6  # radians: closer than this to 0 or pi counts as (anti)parallel
ZERO_NORM: Final = 1e-12  # a vector this short has no direction


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Poses between `a` (t=0) and `b` (t=1), both (D,): direction by great-circle
    interpolation, norm linearly; (N, D) float32 for N values of `t` ((D,) for a scalar).

    t=0 and t=1 return `a` and `b` exactly. Parallel directions reduce to normalized linear
    interpolation; antiparallel ones have no unique great circle, so the path turns through
    the axis least aligned with `a` (deterministic). A zero vector has no direction: the
    segment is then linear.
    """
    scalar = np.ndim(t) == 0
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    a64, b64 = _vector(a, "a"), _vector(b, "b")
    if a64.shape != b64.shape:
        raise ValueError(f"a and b differ in shape: {a64.shape} vs {b64.shape}")
    na, nb = float(np.linalg.norm(a64)), float(np.linalg.norm(b64))
    if na < ZERO_NORM or nb < ZERO_NORM:
        out = (1 - ts)[:, None] * a64 + ts[:, None] * b64
    else:
        ua, ub = a64 / na, b64 / nb
        theta = math.acos(min(1.0, max(-1.0, float(ua @ ub))))
        if theta < PARALLEL_EPS:
            mixed = (1 - ts)[:, None] * ua + ts[:, None] * ub
            u = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
        elif math.pi - theta < PARALLEL_EPS:
            w = _orthogonal(ua)
            u = np.cos(math.pi * ts)[:, None] * ua + np.sin(math.pi * ts)[:, None] * w
        else:
            s = math.sin(theta)
            u = (np.sin((1 - ts) * theta)[:, None] * ua + np.sin(ts * theta)[:, None] * ub) / s
        out = ((1 - ts) * na + ts * nb)[:, None] * u
    result = out.astype(np.float32)
    result[ts == 0.0] = np.asarray(a, dtype=np.float32)
    result[ts == 1.0] = np.asarray(b, dtype=np.float32)
    return result[0] if scalar else result


def lerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float) -> np.ndarray:
    """Straight-line interpolation, for comparison and for callers who want it; same contract
    as `slerp` (exact endpoints)."""
    scalar = np.ndim(t) == 0
    ts = np.atleast_1d(np.asarray(t, dtype=np.float64))
    a64, b64 = _vector(a, "a"), _vector(b, "b")
    result = ((1 - ts)[:, None] * a64 + ts[:, None] * b64).astype(np.float32)
    result[ts == 0.0] = np.asarray(a, dtype=np.float32)
    result[ts == 1.0] = np.asarray(b, dtype=np.float32)
    return result[0] if scalar else result


def _vector(x: np.ndarray, name: str) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"{name} must be a non-empty vector, got shape {v.shape}")
    if not np.isfinite(v).all():
        raise ValueError(f"{name} contains NaN or infinity")
    return v


def _orthogonal(u: np.ndarray) -> np.ndarray:
    """A unit vector orthogonal to unit `u`: the basis axis least aligned with it, minus its
    projection on `u` (well conditioned, since that axis is at least 1/sqrt(D) off `u`)."""
    axis = np.zeros_like(u)
    axis[int(np.argmin(np.abs(u)))] = 1.0
    w = axis - (axis @ u) * u
    return w / np.linalg.norm(w)


# --- keyframes -------------------------------------------------------------------------------


def keyframe_indices(times: Sequence[float] | np.ndarray, fps: float) -> np.ndarray:
    """The output frame each keyframe lands on (`round(t * fps)`), checked: at least one,
    times finite and >= 0, and each on a later frame than the one before."""
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    ts = np.asarray(times, dtype=np.float64)
    if ts.ndim != 1 or ts.size == 0:
        raise ValueError("give at least one keyframe")
    if not np.isfinite(ts).all() or (ts < 0).any():
        raise ValueError("keyframe times must be finite and >= 0")
    indices = np.rint(ts * fps).astype(np.int64)
    if (np.diff(indices) <= 0).any():
        raise ValueError(f"keyframe times must increase by at least one frame (1/{fps:g} s)")
    return indices


def keyframe_frame_count(times: Sequence[float] | np.ndarray, fps: float) -> int:
    """How many frames `interpolate_keyframes` makes: from t=0 to the last keyframe."""
    return int(keyframe_indices(times, fps)[-1]) + 1


def interpolate_keyframes(
    times: Sequence[float] | np.ndarray,
    poses: np.ndarray,
    fps: float,
    method: Method = "slerp",
) -> np.ndarray:
    """A pose per frame at `fps` from t=0 to the last keyframe, (T, D) float32.

    Keyframe k sits on frame round(t_k * fps) and that frame equals its pose exactly; frames
    between two keyframes follow `slerp` (or `lerp`) at evenly spaced fractions, so each
    segment moves at an even pace; frames before the first keyframe hold its pose.
    """
    indices = keyframe_indices(times, fps)
    keys = np.asarray(poses, dtype=np.float32)
    if keys.ndim != 2 or len(keys) != len(indices):
        raise ValueError(f"poses must be ({len(indices)}, D), got shape {keys.shape}")
    if not np.isfinite(keys).all():
        raise ValueError("poses contain NaN or infinity")
    between = slerp if method == "slerp" else lerp
    out = np.empty((int(indices[-1]) + 1, keys.shape[1]), dtype=np.float32)
    out[: indices[0] + 1] = keys[0]
    for k in range(len(keys) - 1):
        i0, i1 = int(indices[k]), int(indices[k + 1])
        fractions = np.arange(1, i1 - i0 + 1, dtype=np.float64) / (i1 - i0)
        out[i0 + 1 : i1 + 1] = between(keys[k], keys[k + 1], fractions)
    return out


# --- tracks ----------------------------------------------------------------------------------


def retime_frame_count(
    times: np.ndarray,
    fps: float,
    speed: float = 1.0,
    start_s: float = 0.0,
    end_s: float | None = None,
) -> int:
    """How many frames `retime` makes with these arguments (checked the same way)."""
    start, end = _window(np.asarray(times, dtype=np.float64), fps, speed, start_s, end_s)
    return math.floor((end - start) / speed * fps + 1e-9) + 1


def retime(
    poses: np.ndarray,
    times: np.ndarray,
    fps: float,
    speed: float = 1.0,
    start_s: float = 0.0,
    end_s: float | None = None,
    resample: Resample = "slerp",
) -> np.ndarray:
    """A track's poses played from `start_s` to `end_s` (its own seconds) at `speed` times
    real time, sampled at `fps`: (N, D) float32.

    Output frame j shows the track at start_s + j * speed / fps; that instant is located
    among the track's frame `times` (so a variable frame rate is honoured) and the pose taken
    from the nearest frame or slerped between the two around it.
    """
    track = np.asarray(poses, dtype=np.float32)
    ts = np.asarray(times, dtype=np.float64)
    if track.ndim != 2 or ts.shape != (len(track),) or len(track) == 0:
        raise ValueError(f"poses (T, D) and times (T,) must match, got {track.shape}, {ts.shape}")
    if (np.diff(ts) <= 0).any():
        raise ValueError("track times must increase")
    n = retime_frame_count(ts, fps, speed, start_s, end_s)
    instants = start_s + np.arange(n, dtype=np.float64) * speed / fps
    position = np.interp(instants, ts, np.arange(len(track), dtype=np.float64))
    if resample == "nearest":
        return track[np.rint(position).astype(np.int64)].copy()
    lo = np.floor(position).astype(np.int64)
    hi = np.minimum(lo + 1, len(track) - 1)
    frac = position - lo
    out = np.empty((n, track.shape[1]), dtype=np.float32)
    for j in range(n):
        out[j] = slerp(track[lo[j]], track[hi[j]], float(frac[j]))
    return out


def _window(
    times: np.ndarray, fps: float, speed: float, start_s: float, end_s: float | None
) -> tuple[float, float]:
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    if not math.isfinite(speed) or speed <= 0:
        raise ValueError(f"speed must be positive, got {speed}")
    first, last = float(times[0]), float(times[-1])
    end = last if end_s is None else float(end_s)
    if not (math.isfinite(start_s) and math.isfinite(end)):
        raise ValueError("start_s and end_s must be finite")
    if start_s < first - 1e-9 or end > last + 1e-9 or end < start_s:
        raise ValueError(
            f"need {first:g} <= start_s <= end_s <= {last:g}, got start_s={start_s:g}, "
            f"end_s={end:g}"
        )
    return float(start_s), end


def smooth(poses: np.ndarray, sigma_frames: float) -> np.ndarray:
    """Gaussian smoothing over time (sigma in frames; 0 returns a copy), (T, D) float32.

    The ends are padded by repeating the first and last pose, so a track that starts or ends
    still is not pulled towards its neighbours; the kernel reaches 3 sigma each way.
    """
    track = np.asarray(poses, dtype=np.float32)
    if track.ndim != 2:
        raise ValueError(f"poses must be (T, D), got shape {track.shape}")
    if not math.isfinite(sigma_frames) or sigma_frames < 0:
        raise ValueError(f"sigma_frames must be >= 0, got {sigma_frames}")
    if sigma_frames == 0 or len(track) < 2:
        return track.copy()
    radius = max(1, math.ceil(3 * sigma_frames))
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    weights = np.exp(-0.5 * (offsets / sigma_frames) ** 2)
    weights /= weights.sum()
    padded = np.pad(track.astype(np.float64), ((radius, radius), (0, 0)), mode="edge")
    out = np.zeros(track.shape, dtype=np.float64)
    for k, w in enumerate(weights):
        out += w * padded[k : k + len(track)]
    return out.astype(np.float32)
