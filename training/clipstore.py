"""On-disk layout of preprocessed training clips: `ROOT/<identity>/<video>/<clip>.npz`.

The real preprocessing pipeline and the synthetic generator both write it, so training reads one
format. Frames are JPEG crops concatenated into one byte array; no pickle is ever written or read.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

FORMAT = "lpd-clips"
VERSION = 1
SUFFIX = ".npz"
JPEG_QUALITY = 95
REQUIRED_KEYS = ("jpeg", "jpeg_offsets", "masks", "boxes", "timestamps", "meta")
RESERVED_KEYS = frozenset((*REQUIRED_KEYS, "landmarks"))

# Errors numpy and zipfile raise on a damaged or foreign file (FileNotFoundError is not one).
_READ_ERRORS = (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error)


class ClipStoreError(ValueError):
    """A clip file that is corrupt, truncated or not in this format."""


@dataclass(frozen=True)
class ClipRef:
    """Where one clip lives, found by `scan` without decoding it."""

    identity: str
    video: str
    clip: str
    path: Path
    num_frames: int


@dataclass(frozen=True, eq=False)
class Clip:
    """One clip in memory; frames stay JPEG-encoded until `image(i)` decodes one."""

    jpeg: np.ndarray  # (total_bytes,) uint8
    jpeg_offsets: np.ndarray  # (F + 1,) int64
    masks: np.ndarray  # (F, S, S) uint8, 0..255
    boxes: np.ndarray  # (F, 4) float32, crop box (x0, y0, x1, y1) in source pixels
    timestamps: np.ndarray  # (F,) float64 seconds
    landmarks: np.ndarray | None  # (F, L, 2) float32 crop pixels
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.jpeg_offsets) - 1

    @property
    def image_size(self) -> int:
        return int(self.masks.shape[1])

    def image(self, i: int) -> np.ndarray:
        """Frame i as (S, S, 3) uint8 RGB."""
        i = self._index(i)
        buf = self.jpeg[self.jpeg_offsets[i] : self.jpeg_offsets[i + 1]]
        bgr = cv2.imdecode(buf, cv2.IMREAD_COLOR)
        size = self.image_size
        if bgr is None or bgr.shape != (size, size, 3):
            raise ClipStoreError(f"{self.path}: frame {i} is not a {size}x{size} JPEG")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def images(self) -> np.ndarray:
        """All frames as (F, S, S, 3) uint8 RGB."""
        return np.stack([self.image(i) for i in range(len(self))])

    def mask(self, i: int) -> np.ndarray:
        """Foreground mask of frame i as (S, S) uint8."""
        return self.masks[self._index(i)]

    def _index(self, i: int) -> int:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"frame {i} out of range for a clip of {n} frames")
        return i % n


# --- writing -----------------------------------------------------------------------------------
def write_clip(
    path: str | os.PathLike[str],
    images: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    timestamps: np.ndarray,
    landmarks: np.ndarray | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, Any] | None = None,
    *,
    compress: bool = True,
) -> Path:
    """Validate and write one clip atomically (temp file in the same folder, then os.replace).

    `images` are (F, S, S, 3) uint8 RGB crops; NaN landmarks mark frames where none were found.
    `meta` must be JSON-serialisable and gets the format name, version and sizes added (those
    keys are not the caller's to set).
    """
    path = Path(path)
    if path.suffix != SUFFIX:
        raise ValueError(f"clip path must end with {SUFFIX}: {path}")
    arrays = _validate(images, masks, boxes, timestamps, landmarks, extras or {}, meta or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            (np.savez_compressed if compress else np.savez)(f, **arrays)
            f.flush()
            os.fsync(f.fileno())  # a crash must not leave a renamed but empty clip behind
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; datasets are shared read-only
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def encode_jpegs(images: np.ndarray, quality: int = JPEG_QUALITY) -> tuple[np.ndarray, np.ndarray]:
    """(F, S, S, 3) uint8 RGB -> (concatenated JPEG bytes uint8, offsets int64 (F + 1,))."""
    chunks = []
    for i, rgb in enumerate(images):
        ok, buf = cv2.imencode(
            ".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality]
        )
        if not ok:
            raise ValueError(f"could not JPEG-encode frame {i}")
        chunks.append(buf.reshape(-1))
    offsets = np.zeros(len(chunks) + 1, np.int64)
    offsets[1:] = np.cumsum([len(c) for c in chunks])
    return np.concatenate(chunks).astype(np.uint8, copy=False), offsets


def _validate(
    images: np.ndarray,
    masks: np.ndarray,
    boxes: np.ndarray,
    timestamps: np.ndarray,
    landmarks: np.ndarray | None,
    extras: Mapping[str, np.ndarray],
    meta: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    images = _exact("images", images, np.uint8, 4)
    if images.shape[0] < 1 or images.shape[3] != 3 or images.shape[1] != images.shape[2]:
        raise ValueError(f"images: expected (F>=1, S, S, 3) uint8 RGB, got {images.shape}")
    num, size = images.shape[0], images.shape[1]
    arrays: dict[str, np.ndarray] = {}
    arrays["masks"] = _shaped("masks", _exact("masks", masks, np.uint8, 3), (num, size, size))
    arrays["boxes"] = _shaped("boxes", _real("boxes", boxes, np.float32), (num, 4))
    arrays["timestamps"] = _shaped(
        "timestamps", _real("timestamps", timestamps, np.float64), (num,)
    )
    num_landmarks = None
    if landmarks is not None:
        lms = _real("landmarks", landmarks, np.float32, allow_nan=True)
        if lms.ndim != 3:
            raise ValueError(f"landmarks: expected (F, L, 2), got {lms.shape}")
        num_landmarks = lms.shape[1]
        arrays["landmarks"] = _shaped("landmarks", lms, (num, num_landmarks, 2))
    for name, value in extras.items():
        if not isinstance(name, str) or not name.isidentifier() or name in RESERVED_KEYS:
            raise ValueError(
                f"extra array name {name!r} must be an identifier not in {REQUIRED_KEYS}"
            )
        arrays[name] = _real(f"extras[{name!r}]", value, np.float32)
    arrays["jpeg"], arrays["jpeg_offsets"] = encode_jpegs(images)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "image_size": size,
        "num_frames": num,
        "jpeg_quality": JPEG_QUALITY,
        "num_landmarks": num_landmarks,
        "extras": sorted(extras),
    }
    try:
        text = json.dumps({**meta, **header}, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"meta must be JSON-serialisable: {e}") from e
    arrays["meta"] = np.array(text)  # 0-d unicode array, loadable without pickle
    return arrays


def _exact(name: str, value: np.ndarray, dtype: type[np.generic], ndim: int) -> np.ndarray:
    # Pixels must already be uint8: casting float images in 0..1 would silently give black frames.
    arr = np.asarray(value)
    if arr.dtype != dtype or arr.ndim != ndim:
        raise ValueError(
            f"{name}: expected {ndim}-d {np.dtype(dtype).name}, got {arr.ndim}-d {arr.dtype}"
        )
    return np.ascontiguousarray(arr)


def _real(
    name: str, value: np.ndarray, dtype: type[np.generic], allow_nan: bool = False
) -> np.ndarray:
    arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name}: expected real numbers, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=dtype)
    if np.isinf(arr).any() or (not allow_nan and np.isnan(arr).any()):
        raise ValueError(f"{name}: contains {'infinity' if allow_nan else 'NaN or infinity'}")
    return arr


def _shaped(name: str, arr: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    if arr.shape != shape:
        raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
    return arr


# --- reading -----------------------------------------------------------------------------------
def read_clip(path: str | os.PathLike[str]) -> Clip:
    """Load one clip (frames stay encoded); ClipStoreError if the file is damaged or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with _open(path) as z:
            arrays = {key: z[key] for key in z.files}
    except ClipStoreError:
        raise
    except _READ_ERRORS as e:
        raise ClipStoreError(f"{path}: not a readable {FORMAT} file ({e})") from e
    return _check(path, arrays)


def count_frames(path: str | os.PathLike[str]) -> int:
    """Number of frames, read from the small `jpeg_offsets` member only."""
    path = Path(path)
    try:
        with _open(path) as z:
            offsets = z["jpeg_offsets"]
    except ClipStoreError:
        raise
    except _READ_ERRORS as e:
        raise ClipStoreError(f"{path}: not a readable {FORMAT} file ({e})") from e
    if offsets.ndim != 1 or len(offsets) < 2:
        raise ClipStoreError(f"{path}: jpeg_offsets must be 1-d with at least 2 entries")
    return len(offsets) - 1


def scan(root: str | os.PathLike[str]) -> list[ClipRef]:
    """Every clip under ROOT/<identity>/<video>/, sorted by (identity, video, clip)."""
    refs = []
    for path in Path(root).glob(f"*/*/*{SUFFIX}"):
        if any(part.startswith(".") for part in path.parts[-3:]):
            continue  # temp files of interrupted writes and hidden folders
        identity, video = path.parent.parent.name, path.parent.name
        refs.append(ClipRef(identity, video, path.stem, path, count_frames(path)))
    return sorted(refs, key=lambda r: (r.identity, r.video, r.clip))


def clip_path(root: str | os.PathLike[str], identity: str, video: str, clip: str) -> Path:
    """ROOT/<identity>/<video>/<clip>.npz."""
    return Path(root) / identity / video / f"{clip}{SUFFIX}"


def _open(path: Path) -> Any:
    data = np.load(path, allow_pickle=False)
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise ClipStoreError(f"{path}: a bare .npy array, not an {FORMAT} archive")
    return data


def _check(path: Path, arrays: dict[str, np.ndarray]) -> Clip:
    def fail(message: str) -> ClipStoreError:
        return ClipStoreError(f"{path}: {message}")

    if missing := [key for key in REQUIRED_KEYS if key not in arrays]:
        raise fail(f"missing arrays {missing}; not an {FORMAT} file")
    raw = arrays["meta"]
    if raw.dtype.kind != "U" or raw.ndim != 0:
        raise fail("meta is not a 0-d unicode array")
    try:
        meta = json.loads(str(raw))
    except json.JSONDecodeError as e:
        raise fail(f"meta is not JSON ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise fail(f"meta does not name the {FORMAT} format")
    if meta.get("version") != VERSION:
        raise fail(f"unsupported {FORMAT} version {meta.get('version')!r} (reader: {VERSION})")

    jpeg, offsets, masks = arrays["jpeg"], arrays["jpeg_offsets"], arrays["masks"]
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1:
        raise fail("jpeg must be 1-d uint8")
    if offsets.dtype != np.int64 or offsets.ndim != 1 or len(offsets) < 2:
        raise fail("jpeg_offsets must be 1-d int64 with at least 2 entries")
    if offsets[0] != 0 or offsets[-1] != len(jpeg) or (np.diff(offsets) <= 0).any():
        raise fail("jpeg_offsets do not split the jpeg bytes into non-empty frames")
    num = len(offsets) - 1
    if masks.dtype != np.uint8 or masks.ndim != 3 or masks.shape[0] != num:
        raise fail(f"masks must be ({num}, S, S) uint8, got {masks.shape} {masks.dtype}")
    size = masks.shape[1]
    expected = {"masks": (num, size, size), "boxes": (num, 4), "timestamps": (num,)}
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise fail(f"{key} has shape {arrays[key].shape}, expected {shape}")
    landmarks = arrays.get("landmarks")
    if landmarks is not None and (landmarks.ndim != 3 or landmarks.shape[::2] != (num, 2)):
        raise fail(f"landmarks has shape {landmarks.shape}, expected ({num}, L, 2)")
    extras = {k: v for k, v in arrays.items() if k not in RESERVED_KEYS}
    return Clip(
        jpeg=jpeg,
        jpeg_offsets=offsets,
        masks=masks,
        boxes=arrays["boxes"],
        timestamps=arrays["timestamps"],
        landmarks=landmarks,
        extras=extras,
        meta=meta,
        path=path,
    )
