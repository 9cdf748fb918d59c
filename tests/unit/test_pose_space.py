"""model.pose_space: slerp geometry, keyframe sequences (exact endpoints, smoothness bound),
retiming and temporal smoothing, on random 256-d descriptors."""

from __future__ import annotations

import math

import numpy as np
import pytest

from model.pose_space import (
    interpolate_keyframes,
    keyframe_frame_count,
    keyframe_indices,
    lerp,
    retime,
    retime_frame_count,
    slerp,
    smooth,
)

D = 256
RTOL = 1e-5


def rng_poses(n: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Norms vary by keyframe, as real descriptors' do.
    poses = rng.normal(size=(n, D)) * rng.uniform(0.5, 2.0, size=(n, 1)) * scale
    return poses.astype(np.float32)


def angle(a: np.ndarray, b: np.ndarray) -> float:
    cos = float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b))
    return math.acos(min(1.0, max(-1.0, cos)))


def speed_bound(a: np.ndarray, b: np.ndarray) -> float:
    """The largest |dp/ds| of slerp(a, b, s) over s in [0, 1]: the norm changes at
    |nb - na| and the direction sweeps the angle at radius <= max(na, nb)."""
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return math.sqrt((nb - na) ** 2 + (max(na, nb) * angle(a, b)) ** 2)


# --- slerp -----------------------------------------------------------------------------------


def test_slerp_endpoints_are_exact_and_dtype_float32() -> None:
    a, b = rng_poses(2)
    out = slerp(a, b, np.array([0.0, 0.5, 1.0]))
    assert out.dtype == np.float32 and out.shape == (3, D)
    assert np.array_equal(out[0], a) and np.array_equal(out[2], b)
    assert np.array_equal(slerp(a, b, 0.0), a)  # scalar t -> (D,)


def test_slerp_moves_on_the_great_circle_with_a_linear_norm() -> None:
    a, b = rng_poses(2, seed=1)
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    ts = np.linspace(0, 1, 11)
    out = slerp(a, b, ts)
    norms = np.linalg.norm(out.astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, (1 - ts) * na + ts * nb, rtol=RTOL)
    theta = angle(a, b)
    for t, p in zip(ts, out, strict=True):
        assert angle(a, p) == pytest.approx(t * theta, abs=1e-4)
        assert angle(p, b) == pytest.approx((1 - t) * theta, abs=1e-4)
    # The halfway pose of equal-norm poses keeps the norm; a straight line would shrink it.
    c = b / nb * na
    assert np.linalg.norm(slerp(a, c, 0.5)) == pytest.approx(na, rel=RTOL)
    assert np.linalg.norm(lerp(a, c, 0.5)) < 0.99 * na


def test_slerp_parallel_antiparallel_and_zero() -> None:
    a = rng_poses(1, seed=2)[0]
    np.testing.assert_allclose(slerp(a, 2 * a, 0.5), 1.5 * a, rtol=RTOL)
    half = slerp(a, -a, 0.5)  # no unique great circle: a deterministic perpendicular one
    assert abs(float(half @ a)) < 1e-3 * float(a @ a)
    assert np.linalg.norm(half) == pytest.approx(np.linalg.norm(a), rel=RTOL)
    assert angle(a, slerp(a, -a, 0.25)) == pytest.approx(math.pi / 4, abs=1e-4)
    zero = np.zeros(D, np.float32)
    np.testing.assert_allclose(slerp(zero, a, 0.25), 0.25 * a, rtol=RTOL)
    with pytest.raises(ValueError, match="NaN"):
        slerp(a, np.full(D, np.nan, np.float32), 0.5)


# --- keyframes -------------------------------------------------------------------------------


def test_keyframes_hit_their_frames_exactly_and_hold_before_the_first() -> None:
    keys = rng_poses(4, seed=3)
    times, fps = [0.4, 1.0, 1.3, 2.5], 10.0
    out = interpolate_keyframes(times, keys, fps)
    idx = keyframe_indices(times, fps)
    assert list(idx) == [4, 10, 13, 25]
    assert out.shape == (26, D) and keyframe_frame_count(times, fps) == 26
    for k, i in enumerate(idx):
        assert np.array_equal(out[i], keys[k])
    assert all(np.array_equal(out[i], keys[0]) for i in range(4))


@pytest.mark.parametrize("seed", range(5))
def test_no_frame_to_frame_jump_exceeds_the_keyframe_gap_per_step(seed: int) -> None:
    """The smoothness property. Per segment (keys k, k+1 over n frames) every step is at most
    the segment's path length / n: for `linear` that is |k_{k+1} - k_k| / n, the chord (it
    holds with equality); for `slerp` the path is the arc, at most speed_bound / n. The arc
    is longer than the chord, by (theta/2)/sin(theta/2) at equal norms, so the chord bound
    itself only holds for slerp within that factor (checked too)."""
    rng = np.random.default_rng(seed)
    keys = rng_poses(5, seed=seed)
    fps = 25.0
    steps = rng.integers(1, 40, size=4)
    times = np.concatenate([[0.0], np.cumsum(steps)]) / fps
    idx = keyframe_indices(times, fps)
    for method in ("linear", "slerp"):
        out = interpolate_keyframes(times, keys, fps, method).astype(np.float64)
        jumps = np.linalg.norm(np.diff(out, axis=0), axis=1)
        worst_allowed = 0.0
        for k in range(len(keys) - 1):
            a, b, n = keys[k], keys[k + 1], int(idx[k + 1] - idx[k])
            seg = jumps[idx[k] : idx[k + 1]]
            chord = float(np.linalg.norm(b.astype(np.float64) - a))
            if method == "linear":
                np.testing.assert_allclose(seg, chord / n, rtol=1e-4)
                allowed = chord / n
            else:
                allowed = speed_bound(a, b) / n
                assert seg.max() <= allowed * (1 + RTOL)
                arc_factor = (angle(a, b) / 2) / math.sin(angle(a, b) / 2)
                ratio = max(np.linalg.norm(a), np.linalg.norm(b)) / min(
                    np.linalg.norm(a), np.linalg.norm(b)
                )
                assert seg.max() <= chord / n * arc_factor * ratio * (1 + RTOL)
            worst_allowed = max(worst_allowed, allowed)
        assert jumps.max() <= worst_allowed * (1 + RTOL)


def test_equal_norm_slerp_moves_at_an_even_pace() -> None:
    a, b = rng_poses(2, seed=7)
    b = b / np.linalg.norm(b) * np.linalg.norm(a)
    out = interpolate_keyframes([0.0, 1.0], np.stack([a, b]), 20.0).astype(np.float64)
    jumps = np.linalg.norm(np.diff(out, axis=0), axis=1)
    theta, r = angle(a, b), float(np.linalg.norm(a))
    np.testing.assert_allclose(jumps, 2 * r * math.sin(theta / 40), rtol=1e-4)


@pytest.mark.parametrize(
    ("times", "match"),
    [
        ([], "at least one"),
        ([0.0, 0.5, 0.4], "increase"),
        ([0.0, 0.01], "increase"),  # both on frame 0 at 25 fps
        ([-1.0, 1.0], ">= 0"),
        ([0.0, float("nan")], "finite"),
    ],
)
def test_bad_keyframe_times_are_refused(times: list[float], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        keyframe_indices(times, 25.0)


def test_a_single_keyframe_is_a_still() -> None:
    key = rng_poses(1, seed=4)
    out = interpolate_keyframes([0.2], key, 10.0)
    assert out.shape == (3, D) and all(np.array_equal(row, key[0]) for row in out)


# --- retime and smooth -----------------------------------------------------------------------


def test_retime_identity_speed_and_window() -> None:
    track = rng_poses(50, seed=5)
    times = np.arange(50) / 25.0
    for resample in ("slerp", "nearest"):
        same = retime(track, times, 25.0, resample=resample)
        assert np.array_equal(same, track)  # every instant lands on a frame: exact copies
    fast = retime(track, times, 25.0, speed=2.0, resample="nearest")
    assert len(fast) == 25 and np.array_equal(fast, track[::2])
    slow = retime(track, times, 25.0, speed=0.5)
    assert len(slow) == 99 == retime_frame_count(times, 25.0, speed=0.5)
    assert np.array_equal(slow[::2], track)
    np.testing.assert_allclose(slow[1], slerp(track[0], track[1], 0.5), rtol=1e-6)
    window = retime(track, times, 25.0, start_s=0.4, end_s=1.0)
    assert np.array_equal(window, track[10:26])
    fewer = retime(track, times, 5.0)  # resampled to 5 fps: every fifth frame
    assert np.array_equal(fewer, track[::5])


def test_retime_follows_variable_frame_times() -> None:
    track = rng_poses(3, seed=6)
    times = np.array([0.0, 0.1, 0.5])  # a long gap after frame 1
    out = retime(track, times, 10.0)
    assert len(out) == 6
    np.testing.assert_allclose(out[3], slerp(track[1], track[2], 0.5), rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"speed": 0.0}, "speed"),
        ({"start_s": 1.5}, "start_s"),
        ({"start_s": 1.0, "end_s": 0.5}, "start_s"),
        ({"end_s": 5.0}, "end_s"),
    ],
)
def test_retime_refuses_bad_windows(kwargs: dict[str, float], match: str) -> None:
    times = np.arange(25) / 25.0
    with pytest.raises(ValueError, match=match):
        retime_frame_count(times, 25.0, **kwargs)


def test_smooth_reduces_jitter_and_keeps_a_still_track() -> None:
    rng = np.random.default_rng(8)
    base = np.repeat(rng_poses(1, seed=8), 100, axis=0)
    assert np.array_equal(smooth(base, 3.0), base)
    noisy = base + rng.normal(0, 0.1, base.shape).astype(np.float32)
    smoothed = smooth(noisy, 3.0)
    assert smoothed.shape == noisy.shape
    jitter = lambda x: np.linalg.norm(np.diff(x, axis=0), axis=1).mean()  # noqa: E731
    assert jitter(smoothed) < jitter(noisy) / 4
    assert np.abs(smoothed - base).mean() < np.abs(noisy - base).mean() / 2
    assert np.array_equal(smooth(noisy, 0.0), noisy)
    with pytest.raises(ValueError, match="sigma"):
        smooth(noisy, -1.0)
