"""The clip store: lossless round trip (JPEG aside), atomic writes, typed errors, scanning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from training import clipstore
from training.clipstore import ClipStoreError, clip_path, read_clip, scan, write_clip

pytestmark = pytest.mark.unit

F, S, L = 4, 32, 68


def smooth_images(num: int = F, size: int = S) -> np.ndarray:
    """Gradients compress well, so JPEG error stays small and the tolerance can be tight."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    frames = [
        np.stack([xx * 200 + 20 * k, yy * 200, (xx + yy) * 100 + 10 * k], -1) for k in range(num)
    ]
    return np.clip(frames, 0, 255).astype(np.uint8)


def clip_arrays(num: int = F) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "images": smooth_images(num),
        "masks": rng.integers(0, 256, (num, S, S), dtype=np.uint8),
        "boxes": rng.uniform(0, 500, (num, 4)).astype(np.float32),
        "timestamps": np.arange(num) / 25.0,
        "landmarks": rng.uniform(0, S, (num, L, 2)).astype(np.float32),
    }


@pytest.fixture
def written(tmp_path: Path) -> Path:
    arrays = clip_arrays()
    extras = {"pose_params": np.arange(F * 3, dtype=np.float32).reshape(F, 3)}
    return write_clip(tmp_path / "clip.npz", **arrays, extras=extras, meta={"source": "test"})


def test_round_trip(tmp_path: Path) -> None:
    arrays = clip_arrays()
    extras = {"identity_params": np.linspace(0, 1, 7, dtype=np.float32)}
    path = write_clip(tmp_path / "a" / "b.npz", **arrays, extras=extras, meta={"source": "test"})
    clip = read_clip(path)

    assert len(clip) == F and clip.image_size == S
    images = clip.images()
    assert images.shape == (F, S, S, 3) and images.dtype == np.uint8
    error = np.abs(images.astype(int) - arrays["images"].astype(int))
    assert error.mean() < 2.0 and error.max() < 24  # JPEG quality 95 on smooth images
    assert np.array_equal(clip.image(-1), images[-1])
    assert np.array_equal(clip.masks, arrays["masks"])
    assert np.array_equal(clip.mask(2), arrays["masks"][2])
    assert np.array_equal(clip.boxes, arrays["boxes"]) and clip.boxes.dtype == np.float32
    assert np.array_equal(clip.timestamps, arrays["timestamps"])
    assert clip.timestamps.dtype == np.float64
    assert clip.landmarks is not None
    assert np.array_equal(clip.landmarks, arrays["landmarks"])
    assert clip.extras.keys() == {"identity_params"}
    assert np.array_equal(clip.extras["identity_params"], extras["identity_params"])
    assert clip.meta["source"] == "test"
    assert clip.meta["format"] == "lpd-clips" and clip.meta["version"] == 1
    assert clip.meta["image_size"] == S and clip.meta["num_frames"] == F
    with pytest.raises(IndexError):
        clip.image(F)


def test_channels_stay_rgb(tmp_path: Path) -> None:
    images = np.zeros((1, S, S, 3), np.uint8)
    images[..., 0] = 250  # pure red: a BGR mix-up would read back blue
    path = write_clip(
        tmp_path / "red.npz", images, np.zeros((1, S, S), np.uint8), np.zeros((1, 4)), np.zeros(1)
    )
    pixel = read_clip(path).image(0)[S // 2, S // 2]
    assert pixel[0] > 240 and pixel[2] < 10
    assert read_clip(path).landmarks is None


def test_missing_landmarks_may_be_nan(tmp_path: Path) -> None:
    arrays = clip_arrays()
    arrays["landmarks"][1] = np.nan  # no face found in frame 1
    landmarks = read_clip(write_clip(tmp_path / "nan.npz", **arrays)).landmarks
    assert landmarks is not None and np.isnan(landmarks[1]).all()
    assert np.array_equal(landmarks[0], arrays["landmarks"][0])


def test_meta_is_plain_json_without_pickle(written: Path) -> None:
    with np.load(written, allow_pickle=False) as z:
        assert z["meta"].ndim == 0 and z["meta"].dtype.kind == "U"
        meta = json.loads(str(z["meta"]))
        assert z["jpeg"].dtype == np.uint8 and z["jpeg_offsets"].dtype == np.int64
    assert meta["extras"] == ["pose_params"] and meta["num_landmarks"] == L


def test_write_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_clip(tmp_path / "ok.npz", **clip_arrays())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]

    def crash(*args: object, **kwargs: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(clipstore.np, "savez_compressed", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        write_clip(tmp_path / "new.npz", **clip_arrays())
    with pytest.raises(RuntimeError, match="disk full"):
        write_clip(path, **clip_arrays(2))  # an existing clip survives a failed rewrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.npz"]
    assert len(read_clip(path)) == F


def _corrupt(kind: str, good: Path, bad: Path) -> None:
    data = good.read_bytes()
    if kind == "truncated":
        bad.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        bad.write_bytes(b"")
    elif kind == "text":
        bad.write_text("id,frame\n1,2\n")
    elif kind == "npy":
        with bad.open("wb") as f:
            np.save(f, np.zeros(3))
    elif kind == "foreign_npz":
        with bad.open("wb") as f:
            np.savez(f, x=np.zeros(3))
    elif kind == "wrong_format":
        with np.load(good) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["meta"] = np.array(json.dumps({"format": "other", "version": 1}))
        with bad.open("wb") as f:
            np.savez(f, **arrays)
    elif kind == "bad_offsets":
        with np.load(good) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["jpeg_offsets"] = arrays["jpeg_offsets"][::-1].copy()
        with bad.open("wb") as f:
            np.savez(f, **arrays)
    elif kind == "pickled":
        with bad.open("wb") as f:
            np.savez(f, **clip_arrays(), meta=np.array([{"a": 1}], dtype=object))


@pytest.mark.parametrize(
    "kind",
    ["truncated", "empty", "text", "npy", "foreign_npz", "wrong_format", "bad_offsets", "pickled"],
)
def test_damaged_or_foreign_file_raises(kind: str, written: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.npz"
    _corrupt(kind, written, bad)
    with pytest.raises(ClipStoreError):
        read_clip(bad)
    assert issubclass(ClipStoreError, ValueError)


def test_missing_file_is_not_a_format_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_clip(tmp_path / "nope.npz")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": np.zeros((F, S, S, 3), np.float32)}, "images"),
        ({"images": np.zeros((F, S, S), np.uint8)}, "images"),
        ({"images": np.zeros((F, S, S + 1, 3), np.uint8)}, "images"),
        ({"images": np.zeros((0, S, S, 3), np.uint8)}, "images"),
        ({"masks": np.zeros((F, S, S), np.float32)}, "masks"),
        ({"masks": np.zeros((F - 1, S, S), np.uint8)}, "masks"),
        ({"boxes": np.zeros((F, 5))}, "boxes"),
        ({"boxes": np.full((F, 4), np.nan)}, "boxes"),
        ({"timestamps": np.zeros(F + 1)}, "timestamps"),
        ({"timestamps": np.array(["a"] * F)}, "timestamps"),
        ({"landmarks": np.zeros((F, L, 3))}, "landmarks"),
        ({"landmarks": np.zeros((F, L))}, "landmarks"),
        ({"landmarks": np.full((F, L, 2), np.inf)}, "landmarks"),
        ({"extras": {"masks": np.zeros(3)}}, "extra"),
        ({"extras": {"bad name": np.zeros(3)}}, "extra"),
        ({"meta": {"when": object()}}, "JSON"),
    ],
)
def test_write_validates(tmp_path: Path, change: dict[str, object], message: str) -> None:
    kwargs: dict[str, object] = {**clip_arrays(), **change}
    with pytest.raises(ValueError, match=message):
        write_clip(tmp_path / "x.npz", **kwargs)  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())


def test_write_needs_npz_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.npz"):
        write_clip(tmp_path / "x.npy", **clip_arrays())


def test_scan_finds_clips_sorted_with_frame_counts(tmp_path: Path) -> None:
    layout = [("id00002", "vid", "00000", 2), ("id00001", "b", "00001", 3)]
    layout += [("id00001", "a", "00000", 1), ("id00001", "b", "00000", 2)]
    for identity, video, clip, num in layout:
        write_clip(clip_path(tmp_path, identity, video, clip), **clip_arrays(num))
    (tmp_path / "id00001" / "a" / ".00001.npz.abc.tmp").write_bytes(b"partial")
    (tmp_path / "notes.npz").write_bytes(b"not in the layout")

    refs = scan(tmp_path)
    got = [(r.identity, r.video, r.clip, r.num_frames) for r in refs]
    assert got == sorted(layout)
    assert all(r.path == clip_path(tmp_path, r.identity, r.video, r.clip) for r in refs)
    assert scan(tmp_path / "missing") == []
