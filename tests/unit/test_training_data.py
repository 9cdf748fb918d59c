"""Preprocessing CLI on real encoded clips, the K+1 dataset, and the pose augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage import data

from tests.media_samples import encode_clip, panning_frames, tone
from training.augment import APPEARANCE_OPS, PoseAugmentConfig, PoseAugmenter, scale_xy
from training.clipstore import read_clip, scan
from training.data import DataConfig, VideoDataset, split_identities
from training.prepare import PrepareConfig, main, prepare


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two identities with real faces, plus a corrupt clip and a clip without a face."""
    src = tmp_path_factory.mktemp("vox")
    frames = panning_frames(12, noise=2.0)
    for identity, video, flip in (("id00001", "vidA", False), ("id00002", "vidB", True)):
        (src / identity / video).mkdir(parents=True)
        clip = [np.ascontiguousarray(f[:, ::-1]) if flip else f for f in frames]
        encode_clip(src / identity / video / "00001.mp4", clip, audio=tone(0.5))
        encode_clip(src / identity / video / "00002.mp4", clip[::-1])
    (src / "id00003" / "vidC").mkdir(parents=True)
    (src / "id00003" / "vidC" / "00001.mp4").write_bytes(b"\x00" * 1000)
    coffee = np.ascontiguousarray(data.coffee()[:256, :256])
    encode_clip(src / "id00003" / "vidC" / "00002.mp4", [coffee] * 4)
    return src


@pytest.fixture(scope="module")
def prepared(source_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    dst = tmp_path_factory.mktemp("clips")
    assert main([str(source_tree), str(dst), "--size", "64", "--every", "2"]) == 0
    return dst


def test_prepare_writes_crops_and_reports_bad_clips(prepared: Path) -> None:
    refs = scan(prepared)
    assert [(r.identity, r.video, r.clip) for r in refs] == [
        ("id00001", "vidA", "00001"),
        ("id00001", "vidA", "00002"),
        ("id00002", "vidB", "00001"),
        ("id00002", "vidB", "00002"),
    ]
    assert all(r.num_frames == 6 for r in refs)  # 12 frames, every 2nd
    clip = read_clip(refs[0].path)
    assert clip.image(0).shape == (64, 64, 3)
    assert 0.2 < (clip.masks > 127).mean() < 0.95  # a person, not the whole crop
    assert clip.timestamps.tolist() == pytest.approx([i * 2 / 25 for i in range(6)])
    report = json.loads((prepared / "prepare_report.json").read_text())
    codes = {Path(f["clip"]).name: f["code"] for f in report["failed"]}
    assert codes == {"00001.mp4": "unreadable_media", "00002.mp4": "no_face"}


def test_prepare_is_resumable_and_parallel(
    source_tree: Path, prepared: Path, tmp_path: Path
) -> None:
    before = {r.path: r.path.stat().st_mtime_ns for r in scan(prepared)}
    report = prepare(source_tree, prepared, PrepareConfig(size=64, every=2))
    assert report["skipped_existing"] == 4 and report["prepared"] == 0
    assert {r.path: r.path.stat().st_mtime_ns for r in scan(prepared)} == before
    parallel = prepare(source_tree, tmp_path, PrepareConfig(size=64, every=2), workers=2)
    assert parallel["prepared"] == 4
    a, b = read_clip(scan(prepared)[2].path), read_clip(scan(tmp_path)[2].path)
    np.testing.assert_array_equal(a.images(), b.images())


def test_dataset_yields_k_plus_one_frames_of_one_video(prepared: Path) -> None:
    ds = VideoDataset(DataConfig(root=str(prepared), k=3))
    assert len(ds) == ds.num_labels == 2  # two videos (clips of one video are pooled)
    sample = ds[1]
    assert sample.identity_images.shape == (3, 3, 64, 64)
    assert sample.pose_image.shape == sample.target.shape == (3, 64, 64)
    assert sample.mask.shape == (1, 64, 64)
    assert sample.label == 1
    for t in (sample.identity_images, sample.pose_image, sample.mask):
        assert t.dtype == torch.float32 and t.min() >= 0 and t.max() <= 1
    # identity frames come unaugmented from the driver's own video (flipped identity 2)
    vid_b = [read_clip(r.path) for r in scan(prepared) if r.video == "vidB"]
    stored = {clip.image(i).tobytes() for clip in vid_b for i in range(len(clip))}
    for image in sample.identity_images:
        as_uint8 = (image.permute(1, 2, 0) * 255).round().byte().numpy()
        assert as_uint8.tobytes() in stored


def test_dataset_is_reproducible_per_epoch(prepared: Path) -> None:
    ds = VideoDataset(DataConfig(root=str(prepared), k=2, seed=3))
    a, b = ds[0], ds[0]
    assert torch.equal(a.pose_image, b.pose_image)
    assert torch.equal(a.identity_images, b.identity_images)
    later = []
    for epoch in (1, 2, 3):
        ds.set_epoch(epoch)
        later.append(ds[0].identity_images)
    assert any(not torch.equal(x, a.identity_images) for x in later)  # new draws each epoch
    ds.set_epoch(0)
    assert torch.equal(ds[0].identity_images, a.identity_images)


def test_dataset_split_by_identity(prepared: Path) -> None:
    train = VideoDataset(DataConfig(root=str(prepared), split="train", val_fraction=0.5))
    val = VideoDataset(DataConfig(root=str(prepared), split="val", val_fraction=0.5))
    assert {v.identity for v in train.videos}.isdisjoint({v.identity for v in val.videos})
    assert len(train) + len(val) == 2
    assert split_identities(["a", "b", "c", "d"], 0.25, 0) == split_identities(
        ["d", "c", "b", "a"], 0.25, 0
    )
    with pytest.raises(ValueError, match="no val videos"):
        VideoDataset(DataConfig(root=str(prepared), split="val"))


def test_augmentation_touches_only_the_pose_input() -> None:
    rng = np.random.default_rng(0)
    image = data.astronaut()[::4, ::4].copy()
    mask = np.full(image.shape[:2], 255, np.uint8)
    aug = PoseAugmenter(PoseAugmentConfig(shift_p=0.0))
    changed = 0
    for _ in range(10):
        pose, target, out_mask = aug(image, image, mask, rng)
        assert pose.shape == image.shape and pose.dtype == np.uint8
        np.testing.assert_array_equal(target, image)
        np.testing.assert_array_equal(out_mask, mask)
        changed += not np.array_equal(pose, image)
    assert changed >= 7  # SomeOf(0..5) plus the rescale leaves a few untouched


def test_shared_shift_moves_all_three_together() -> None:
    rng = np.random.default_rng(1)
    image = np.zeros((64, 64, 3), np.uint8)
    image[20:40, 20:40] = 255
    aug = PoseAugmenter(PoseAugmentConfig(max_appearance_ops=0, scale_p=0.0, shift_p=1.0))
    pose, target, mask = aug(image, image, image[..., 0], rng)
    np.testing.assert_array_equal(target[..., 0] > 127, mask > 127)
    assert not np.array_equal(target, image)
    com = lambda m: np.argwhere(m > 127).mean(0)  # noqa: E731
    np.testing.assert_allclose(com(pose[..., 0]), com(mask), atol=0.5)


def test_every_appearance_op_keeps_uint8_images() -> None:
    rng = np.random.default_rng(2)
    image = data.astronaut()[::8, ::8].copy()
    for op in APPEARANCE_OPS:
        out = op(image, rng)
        assert out.shape == image.shape and out.dtype == np.uint8, op.__name__
    stretched = scale_xy(image, 1.2, 0.8)
    assert stretched.shape == image.shape
    assert (
        PoseAugmenter(PoseAugmentConfig(enabled=False))(image, image, image[..., 0], rng)[0]
        is image
    )
