"""Synthetic talking heads: determinism, identity/pose disentanglement, ground truth, the CLI."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from benchmarks.synthetic_speed import main as bench_main
from training.clipstore import read_clip, scan
from training.synthetic import (
    HAIR_STYLES,
    NUM_LANDMARKS,
    IdentityParams,
    PoseParams,
    identity_for,
    main,
    poses_for,
    render,
)

pytestmark = pytest.mark.unit

S = 96
YAW_LEFT, YAW_RIGHT = PoseParams(yaw=-0.45), PoseParams(yaw=0.45)


def identities(n: int = 6, seed: int = 0) -> list[IdentityParams]:
    return [identity_for(seed, i) for i in range(n)]


def test_sampling_is_deterministic_by_seed() -> None:
    assert identity_for(3, 1) == identity_for(3, 1)
    assert identity_for(3, 1) != identity_for(4, 1)
    assert identity_for(3, 1) != identity_for(3, 2)
    assert poses_for(3, 1, 0, 30) == poses_for(3, 1, 0, 30)
    assert poses_for(3, 1, 0, 30) != poses_for(3, 1, 1, 30)


def test_poses_are_smooth_and_in_range() -> None:
    poses = np.stack([p.to_vector() for p in poses_for(0, 0, 0, 250)])
    names = PoseParams.names()
    yaw = poses[:, names.index("yaw")]
    assert np.abs(yaw).max() <= 0.6 + 1e-6 and yaw.std() > 0.02  # moves, within range
    assert np.abs(np.diff(yaw)).max() < 0.1  # no jumps between frames at 25 fps
    for name in ("mouth_open", "smile", "blink_left", "blink_right"):
        column = poses[:, names.index(name)]
        assert column.min() >= 0.0 and column.max() <= 1.0
    assert poses[:, names.index("blink_left")].max() > 0.9  # 10 s of video has a blink


def test_parameter_vectors_round_trip() -> None:
    for identity in identities(4):
        vector = identity.to_vector()
        assert vector.dtype == np.float32 and vector.shape == (len(IdentityParams.names()),)
        assert IdentityParams.from_vector(vector).to_vector().tolist() == vector.tolist()
    pose = poses_for(0, 0, 0, 5)[3]
    assert np.allclose(PoseParams.from_vector(pose.to_vector()).to_vector(), pose.to_vector())
    with pytest.raises(ValueError, match="needs"):
        PoseParams.from_vector(np.zeros(3))


def test_render_is_pure_and_deterministic() -> None:
    identity, pose = identity_for(0, 2), poses_for(0, 2, 0, 8)[5]
    a, b = render(identity, pose, S), render(identity, pose, S)
    assert a.image.shape == (S, S, 3) and a.image.dtype == np.uint8
    assert a.mask.shape == (S, S) and a.mask.dtype == np.uint8
    assert a.landmarks.shape == (NUM_LANDMARKS, 2) and a.landmarks.dtype == np.float32
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.landmarks, b.landmarks)
    a.image[:] = 0  # the caller owns the arrays; nothing cached is shared
    assert np.array_equal(render(identity, pose, S).image, b.image)


def test_pose_change_moves_pixels_not_identity() -> None:
    identity = identity_for(0, 1)
    left, right = render(identity, YAW_LEFT, S), render(identity, YAW_RIGHT, S)
    assert np.abs(left.image.astype(int) - right.image.astype(int)).mean() > 2.0
    assert np.array_equal(left.identity_vector, right.identity_vector)
    assert not np.array_equal(left.pose_vector, right.pose_vector)
    blink = render(identity, PoseParams(blink_left=1.0, blink_right=1.0), S)
    assert not np.array_equal(blink.image, render(identity, PoseParams(), S).image)


def test_identity_change_keeps_pose_geometry() -> None:
    """Pose drives the landmarks; identity shape moves them only a little."""
    people = identities(8)
    for pose in (PoseParams(), YAW_LEFT, PoseParams(pitch=0.25, roll=-0.15, mouth_open=0.8)):
        marks = np.stack([render(p, pose, S).landmarks for p in people])  # (N, 68, 2)
        spread = np.linalg.norm(marks - marks.mean(0), axis=-1).mean()
        assert spread < 0.04 * S
    for person in people:
        left, right = render(person, YAW_LEFT, S).landmarks, render(person, YAW_RIGHT, S).landmarks
        assert np.linalg.norm(left - right, axis=-1).mean() > 0.08 * S
        nose_tip = 30
        assert right[nose_tip, 0] - left[nose_tip, 0] > 0.1 * S  # yaw > 0 turns toward image right
        up = render(person, PoseParams(pitch=0.25), S).landmarks
        down = render(person, PoseParams(pitch=-0.25), S).landmarks
        assert down[nose_tip, 1] > up[nose_tip, 1]  # image y grows downward


def test_landmarks_follow_ibug_layout() -> None:
    lm = render(identity_for(0, 0), PoseParams(), S).landmarks
    assert lm[36, 0] < lm[39, 0] < lm[42, 0] < lm[45, 0]  # outer/inner corners, left to right
    assert lm[0, 0] < lm[8, 0] < lm[16, 0] and lm[8, 1] > lm[57, 1] > lm[51, 1] > lm[33, 1]
    assert lm[19, 1] < lm[37, 1] and lm[27, 1] < lm[30, 1]  # brows above eyes, bridge down
    assert lm[48, 0] < lm[51, 0] < lm[54, 0]


def test_landmarks_inside_image_and_mask() -> None:
    for index, person in enumerate(identities(6, seed=1)):
        for pose in poses_for(1, index, 0, 40)[::8]:
            frame = render(person, pose, S)
            x, y = frame.landmarks[:, 0], frame.landmarks[:, 1]
            assert (x >= 0).all() and (x < S).all() and (y >= 0).all() and (y < S).all()
            col, row = (np.round(v).astype(int).clip(0, S - 1) for v in (x, y))
            assert (frame.mask[row, col] > 127).mean() >= 0.9


@pytest.mark.parametrize("style", range(len(HAIR_STYLES)))
def test_mask_is_plausible_for_every_hair_style(style: int) -> None:
    person = dataclasses.replace(identity_for(2, style), hair_style=style)
    for pose in (PoseParams(), YAW_RIGHT, PoseParams(pitch=-0.3, roll=0.2)):
        frame = render(person, pose, S)
        mask = frame.mask
        assert mask[0, 0] == 0 and mask[0, -1] == 0 and mask[S // 2, 0] == 0  # background
        assert mask[S // 2, S // 2] == 255 and mask[-1, S // 2] == 255  # face, shoulders
        assert 0.2 < (mask > 127).mean() < 0.75
        assert ((mask > 0) & (mask < 255)).mean() < 0.1  # soft edges only


def test_cli_writes_clips_and_skips_existing(tmp_path: Path) -> None:
    out = tmp_path / "synth"
    argv = [str(out), "--identities", "2", "--clips", "2", "--frames", "3", "--size", "32"]
    assert main([*argv, "--seed", "5"]) == 0
    refs = scan(out)
    assert [(r.identity, r.video, r.clip) for r in refs] == [
        (f"id0000{i}", "synth", f"0000{c}") for i in range(2) for c in range(2)
    ]
    assert all(r.num_frames == 3 for r in refs)

    clip = read_clip(refs[3].path)
    assert clip.image_size == 32 and clip.landmarks is not None
    assert clip.landmarks.shape == (3, NUM_LANDMARKS, 2)
    assert np.array_equal(clip.extras["identity_params"], identity_for(5, 1).to_vector())
    poses = np.stack([p.to_vector() for p in poses_for(5, 1, 1, 3)])
    assert np.array_equal(clip.extras["pose_params"], poses)
    assert clip.meta["source"] == "synthetic" and clip.meta["identity_index"] == 1
    assert clip.meta["pose_param_names"] == list(PoseParams.names())
    assert np.allclose(clip.timestamps, np.arange(3) / 25.0)
    assert np.array_equal(clip.boxes[0], [0, 0, 32, 32])

    mtimes = {r.path: r.path.stat().st_mtime_ns for r in refs}
    refs[0].path.unlink()
    assert main([*argv, "--seed", "5"]) == 0  # resumes: rewrites only the missing clip
    assert len(scan(out)) == 4
    assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items() if p != refs[0].path)


def test_cli_output_does_not_depend_on_workers(tmp_path: Path) -> None:
    common = ["--identities", "2", "--clips", "1", "--frames", "2", "--size", "24", "--seed", "9"]
    assert main([str(tmp_path / "one"), *common]) == 0
    assert main([str(tmp_path / "two"), *common, "--workers", "2"]) == 0
    for a, b in zip(scan(tmp_path / "one"), scan(tmp_path / "two"), strict=True):
        ca, cb = read_clip(a.path), read_clip(b.path)
        assert np.array_equal(ca.jpeg, cb.jpeg) and np.array_equal(ca.masks, cb.masks)
        assert ca.landmarks is not None and cb.landmarks is not None
        assert np.array_equal(ca.landmarks, cb.landmarks)


def test_cli_grid(tmp_path: Path) -> None:
    grid = tmp_path / "grid.png"
    argv = [str(tmp_path / "d"), "--identities", "2", "--clips", "0", "--size", "32"]
    assert main([*argv, "--grid", str(grid)]) == 0
    image = cv2.imread(str(grid))
    assert image is not None
    assert image.shape[1] == 6 * 32 and image.shape[0] > 3 * 32  # 2 identities + the demo row
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_speed_benchmark_smoke(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["--sizes", "32", "--frames", "2", "--warmup", "0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "synthetic_speed"
    (row,) = report["results"]
    assert row["size"] == 32 and row["render"]["frames_per_s"] > 0
    assert row["render_encode"]["frames_per_s"] > 0
