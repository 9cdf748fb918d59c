"""Pose tracks, service side: where a track's files live, their format, the fingerprint of the
pose encoder that made them, and the checks every route runs before a track drives a job.

A track is `track.npz` (descriptors float32 (T, D), frame times (T,), crop boxes (T, 4),
face flags (T,)), plus `audio` (the driver's audio stream, remuxed, not re-encoded) and
`driver` (the original video, only while it may be needed for paste-back). Descriptors are
only meaningful to the pose encoder that produced them (paper Sec. 3: the generator is
trained on that encoder's latent space), so each track records the encoder's fingerprint and
is refused once the served checkpoint has another one.
"""

from __future__ import annotations

import hashlib
import json
import struct
import uuid
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.auth import Principal
from service.config import Settings
from service.errors import ApiError
from service.jobs import TERMINAL
from service.models import Job, JobKind, JobStatus, PoseTrack, PoseTrackStatus, utcnow
from service.storage import ArtifactStore

DESCRIPTORS: Final = "track.npz"
AUDIO: Final = "audio"  # MP4 or Matroska by codec (workers.pose_tracks.extract_audio)
VIDEO: Final = "driver"  # PyAV probes the content, not the name
POSE_ENCODER_PREFIX: Final = "reenactor.pose_encoder."
_HEADER_LIMIT: Final = 100 * 1024 * 1024  # a safetensors header is JSON; more is not one
_CHUNK: Final = 1024 * 1024


# --- files -----------------------------------------------------------------------------------


def track_dir(store: ArtifactStore, tenant_id: str, track_id: str) -> Path:
    """`<root>/tenants/<tenant>/pose_tracks/<track>/`; ids are checked to be UUIDs, so a path
    is never built from anything a client chose."""
    return store.root / "tenants" / _uuid(tenant_id) / "pose_tracks" / _uuid(track_id)


def _uuid(value: str) -> str:
    try:
        if str(uuid.UUID(value)) == value:
            return value
    except (ValueError, TypeError, AttributeError):
        pass
    raise ValueError(f"not an id: {value!r}")


@dataclass(frozen=True)
class TrackData:
    """A track's arrays, one row per driver frame."""

    poses: np.ndarray  # (T, D) float32
    times: np.ndarray  # (T,) float64, seconds
    boxes: np.ndarray  # (T, 4) float64 (paste-back must see the very boxes): x0, y0, x1, y1
    faces: np.ndarray  # (T,) bool: a face was detected in the frame (else the box is held)

    def __post_init__(self) -> None:
        t = len(self.poses)
        if self.poses.ndim != 2 or self.times.shape != (t,) or self.boxes.shape != (t, 4):
            raise ValueError("track arrays disagree in length")
        if self.faces.shape != (t,):
            raise ValueError("track arrays disagree in length")


def save_track(store: ArtifactStore, path: Path, data: TrackData) -> Path:
    """Write the arrays atomically (a reader never sees half a track)."""
    return store.write_arrays(
        path,
        poses=data.poses.astype(np.float32),
        times=data.times.astype(np.float64),
        boxes=data.boxes.astype(np.float64),
        faces=data.faces.astype(bool),
    )


def load_track(path: Path) -> TrackData:
    """Read `track.npz` (no pickles: it holds plain arrays)."""
    with np.load(path, allow_pickle=False) as npz:
        return TrackData(
            poses=np.asarray(npz["poses"], dtype=np.float32),
            times=np.asarray(npz["times"], dtype=np.float64),
            boxes=np.asarray(npz["boxes"], dtype=np.float64),
            faces=np.asarray(npz["faces"], dtype=bool),
        )


# --- the pose encoder's identity -------------------------------------------------------------


def encoder_fingerprint(checkpoint: Path) -> str | None:
    """16 hex digits of sha256 over the checkpoint's pose-encoder tensors (names, dtypes,
    shapes, bytes) and crop size: what decides a track's descriptors. A new checkpoint with
    the same pose encoder keeps its tracks valid. None if the file cannot be read."""
    path = Path(checkpoint)
    try:
        stat = path.stat()
    except OSError:
        return None
    return _fingerprint(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


def checkpoint_pose_dim(checkpoint: Path) -> int | None:
    """D_pose from the checkpoint's config header (no torch); None if unreadable."""
    try:
        header, _ = _safetensors_header(Path(checkpoint))
        config = json.loads(header["__metadata__"]["config"])
        return int(config["pose_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@lru_cache(maxsize=8)
def _fingerprint(path: str, size: int, mtime_ns: int) -> str | None:
    """Cached by (path, size, mtime): hashing a 300 MB checkpoint once per process."""
    try:
        header, data_start = _safetensors_header(Path(path))
    except (OSError, ValueError):
        return None
    digest = hashlib.sha256(b"lpd-pose-encoder-v1")
    try:
        config = json.loads(header.get("__metadata__", {}).get("config", "{}"))
    except ValueError:
        config = {}
    digest.update(json.dumps({"image_size": config.get("image_size")}).encode())
    names = sorted(k for k in header if k.startswith(POSE_ENCODER_PREFIX))
    with open(path, "rb") as f:
        if not names:  # another layout: the whole file stands for the encoder
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        for name in names:
            entry = header[name]
            begin, end = (int(x) for x in entry["data_offsets"])
            digest.update(json.dumps([name, entry["dtype"], entry["shape"]]).encode())
            f.seek(data_start + begin)
            digest.update(f.read(end - begin))
    return digest.hexdigest()[:16]


def _safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("not a safetensors file")
        (length,) = struct.unpack("<Q", raw)
        if length > _HEADER_LIMIT:
            raise ValueError("not a safetensors file")
        header = json.loads(f.read(length))
    if not isinstance(header, dict):
        raise ValueError("not a safetensors file")
    return header, 8 + length


# --- checks for routes -----------------------------------------------------------------------


def get_track_or_404(
    session: Session, principal: Principal, track_id: str, code: str = "not_found"
) -> PoseTrack:
    """The caller's track; other tenants' are 404 like missing ones."""
    track = session.scalar(
        select(PoseTrack).where(
            PoseTrack.id == track_id, PoseTrack.tenant_id == principal.tenant_id
        )
    )
    if track is None:
        raise ApiError(404, code, "no such pose track", {"pose_track_id": track_id})
    return track


def is_expired(track: PoseTrack, now: datetime | None = None) -> bool:
    """Expired, or past its time and waiting for the cleanup to remove the files."""
    if track.status is PoseTrackStatus.EXPIRED:
        return True
    return track.expires_at is not None and track.expires_at <= (now or utcnow())


def require_ready(session: Session, track: PoseTrack) -> None:
    """410 `pose_track_expired` or 409 `pose_track_not_ready` unless its files are usable."""
    if is_expired(track):
        raise ApiError(
            410, "pose_track_expired", "the pose track was deleted after its retention period"
        )
    status = effective_status(session, track)
    if status is not PoseTrackStatus.READY:
        raise ApiError(
            409,
            "pose_track_not_ready",
            f"the pose track is {status.value}; wait until it is ready",
            {"status": status.value},
        )


def require_usable(
    session: Session,
    principal: Principal,
    track_id: str,
    settings: Settings,
    *,
    paste_back: bool = False,
) -> PoseTrack:
    """A track that can drive a job now, or a typed error: 404 `pose_track_not_found`, 410
    `pose_track_expired`, 409 `pose_track_not_ready` / `pose_track_stale` (encoded by
    another pose encoder than the one served) / `pose_track_no_video` (paste-back needs
    the driver video, which this track did not keep)."""
    track = get_track_or_404(session, principal, track_id, code="pose_track_not_found")
    require_ready(session, track)
    served = encoder_fingerprint(settings.base_checkpoint)
    if served is not None and track.encoder != served:
        raise ApiError(
            409,
            "pose_track_stale",
            "the pose track was encoded by another pose encoder than the one served now; "
            "create it again from the video",
            {"encoder": track.encoder, "served": served},
        )
    if paste_back and not track.keep_video:
        raise ApiError(
            409,
            "pose_track_no_video",
            "paste_back needs the driver video, which this pose track did not keep",
        )
    return track


def effective_status(session: Session, track: PoseTrack) -> PoseTrackStatus:
    """The stored status, except that a pending track whose job ended without success reads
    `failed` (a job canceled through /v1/jobs never reaches the worker that records it)."""
    if track.status is not PoseTrackStatus.PENDING or track.job_id is None:
        return track.status
    job = session.get(Job, track.job_id)
    if job is None or (job.status in TERMINAL and job.status is not JobStatus.SUCCEEDED):
        return PoseTrackStatus.FAILED
    return track.status


def jobs_using(session: Session, track_id: str) -> list[str]:
    """Unfinished jobs driven by the track (its own encoding job excluded)."""
    stmt = select(Job.id).where(
        Job.pose_track_id == track_id,
        Job.status.not_in(TERMINAL),
        Job.kind != JobKind.POSE_TRACK,
    )
    return list(session.scalars(stmt))
