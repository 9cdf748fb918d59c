"""The pose-track and render stages, on the reenact queue next to workers.reenact.

`pose_track`: a driver video -> its per-frame pose descriptors through Triton's
`pose_encoder` (pass 1 of a reenactment, then crops -> descriptors), stored with the frame
times, crop boxes, face flags and the audio stream (remuxed, not re-encoded), so that later
reenactments run only the generator (paper Sec. 3: the pose descriptor carries no identity).

`render`: poses chosen by the client (explicit, keyframed, a retimed track; resolved by the
API into one array) -> the avatar through the `generator`, as an MP4 plus matte or a ZIP of
RGBA PNGs.
"""

from __future__ import annotations

import io
import logging
import os
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Final, Protocol

import av
import numpy as np
from PIL import Image
from sqlalchemy import select

from media.geometry import Box
from media.video import REMUX_AUDIO
from service.db import session_scope
from service.jobs import transition
from service.models import Job, JobKind, JobStatus, PoseTrack, PoseTrackStatus
from service.pose_tracks import (
    AUDIO,
    DESCRIPTORS,
    VIDEO,
    TrackData,
    encoder_fingerprint,
    save_track,
    track_dir,
)
from service.schemas import ReenactOptions
from service.triton import TritonBackend, TritonConfig
from workers.reenact import (
    TRACK_SHARE,
    Compositor,
    Outputs,
    Progress,
    crop_batches,
    detect_faces,
    job_condition,
    pose_chunks,
    reenact_job,
    write_chunks,
)
from workers.runtime import JobFailure, Reporter, WorkerContext, claim

logger = logging.getLogger(__name__)

ZIP_FILE: Final = "frames.zip"


class PoseEncoder(Protocol):
    """What making a track needs from the inference server (service.triton)."""

    def image_size(self) -> int: ...

    def encode_pose(self, frames: np.ndarray) -> np.ndarray: ...


# --- pose tracks -----------------------------------------------------------------------------


def extract_audio(video: Path, out: Path) -> bool:
    """Copy the first audio stream of `video` to `out` without re-encoding it (MP4 for the
    codecs MP4 takes, keeping their time base; Matroska for any other); False if there is
    none. Written to a temporary name and renamed, like every stored file."""
    tmp = out.with_name(f".{out.name}.partial")
    try:
        with av.open(str(video)) as src:
            if not src.streams.audio:
                return False
            stream = src.streams.audio[0]
            fmt = "mp4" if stream.codec_context.name in REMUX_AUDIO["mp4"] else "matroska"
            with av.open(str(tmp), "w", format=fmt) as dst:
                copy = dst.add_stream_from_template(stream)
                for packet in src.demux(stream):
                    if packet.dts is None:  # the demuxer's final flush packet
                        continue
                    packet.stream = copy
                    dst.mux(packet)
        os.replace(tmp, out)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def encode_poses(
    backend: PoseEncoder, video: Path, boxes: list[Box], batch: int, report: Progress
) -> np.ndarray | None:
    """Pass 2 of a track: (T, D) float32 descriptors of the driver's crops, `batch` frames
    per request; None if the job was canceled."""
    size = backend.image_size()
    parts: list[np.ndarray] = []
    done = 0
    for frames, _, crops in crop_batches(video, boxes, size, batch):
        parts.append(backend.encode_pose(crops))
        done += len(frames)
        if not report(TRACK_SHARE + (1 - TRACK_SHARE) * done / len(boxes), "encoding"):
            return None
    return np.concatenate(parts).astype(np.float32)


def pose_track_job(ctx: WorkerContext, job_id: str, backend: TritonBackend | None = None) -> None:
    """Make the pose track of job `job_id` (idempotent: a retry encodes from the start)."""
    claimed = claim(ctx, job_id, "pose_track")
    if claimed is None:
        return
    settings, store = ctx.settings, ctx.store
    track_id = str(claimed.params["pose_track_id"])
    folder = track_dir(store, claimed.tenant_id, track_id)
    with session_scope(ctx.sessions) as session:
        track = session.get(PoseTrack, track_id)
        if track is None:
            raise JobFailure("pose_track_not_found", "the pose track was deleted")
        keep_video = track.keep_video
    video = folder / VIDEO
    if not store.pull(video):
        raise JobFailure("no_video", "the driver video is gone")
    encoder = encoder_fingerprint(settings.base_checkpoint)
    if encoder is None:
        raise JobFailure("model_unavailable", "the base checkpoint cannot be read", retryable=True)
    reporter = Reporter(ctx, job_id)
    reporter.update(0.0, "tracking", force=True)
    faces = detect_faces(video, int(claimed.params["driver"]["frames"]), reporter.update)
    if faces is None:
        _discard_if_deleted(ctx, claimed.tenant_id, track_id)
        return
    own_backend = backend is None
    if backend is None:
        backend = TritonBackend(
            TritonConfig.from_settings(settings, max_batch=settings.reenact_batch)
        )
    try:
        poses = encode_poses(backend, video, faces.boxes, settings.reenact_batch, reporter.update)
    finally:
        if own_backend:
            backend.close()
    if poses is None:
        _discard_if_deleted(ctx, claimed.tenant_id, track_id)
        return

    data = TrackData(
        poses=poses,
        times=np.asarray(faces.times, dtype=np.float64),
        boxes=np.asarray([[b.x0, b.y0, b.x1, b.y1] for b in faces.boxes], dtype=np.float64),
        faces=np.asarray(faces.faces, dtype=bool),
    )
    files = [save_track(store, folder / DESCRIPTORS, data)]
    try:
        audio = extract_audio(video, folder / AUDIO)
    except av.FFmpegError as exc:  # an odd stream: the track works without its sound
        logger.warning("job %s: the driver's audio cannot be copied: %s", job_id, exc)
        audio = False
    if audio:
        files.append(folder / AUDIO)
    store.push(*files)  # before the track says it is ready: another host may use it at once
    fps = float(claimed.params["driver"]["fps"]) or 25.0
    result = {
        "frames": len(poses),
        "fps": fps,
        "dim": int(poses.shape[1]),
        "audio": audio,
        "face_frames": int(data.faces.sum()),
    }
    with session_scope(ctx.sessions) as session:
        applied = transition(
            session, job_id, JobStatus.SUCCEEDED, from_=JobStatus.RUNNING, stage="done",
            result=result,
        )  # fmt: skip
        track = session.get(PoseTrack, track_id) if applied else None
        if track is not None:
            track.status = PoseTrackStatus.READY
            track.frames = len(poses)
            track.fps = fps
            track.duration_s = float(data.times[-1] - data.times[0]) + 1.0 / fps
            track.dim = int(poses.shape[1])
            track.face_frames = int(data.faces.sum())
            track.audio = audio
            track.encoder = encoder
    if not applied:  # canceled at the last moment
        for file in files:
            file.unlink(missing_ok=True)
        store.drop(*files)
        _discard_if_deleted(ctx, claimed.tenant_id, track_id)
        return
    if not keep_video:  # only paste-back needs it, and this track may not paste back
        video.unlink(missing_ok=True)
        store.drop(video)
    logger.info("job %s: pose track %s, %d frames", job_id, track_id, len(poses))


def _discard_if_deleted(ctx: WorkerContext, tenant_id: str, track_id: str) -> None:
    """After a cancel: if the track itself was deleted, remove files this task re-created."""
    with session_scope(ctx.sessions) as session:
        gone = session.get(PoseTrack, track_id) is None
    if gone:
        folder = track_dir(ctx.store, tenant_id, track_id)
        for path in sorted(folder.rglob("*"), reverse=True) if folder.is_dir() else []:
            path.unlink() if path.is_file() else path.rmdir()
        if folder.is_dir():
            folder.rmdir()
        ctx.store.drop_dir(folder)


def sync_track_status(ctx: WorkerContext, job_id: str) -> None:
    """A pose-track job that ended without success leaves its track `failed` (the stage
    cannot: run_task records the failure)."""
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.kind is not JobKind.POSE_TRACK or job.pose_track_id is None:
            return
        if job.status not in (JobStatus.FAILED, JobStatus.CANCELED):
            return
        track = session.get(PoseTrack, job.pose_track_id)
        if track is not None and track.status is PoseTrackStatus.PENDING:
            track.status = PoseTrackStatus.FAILED


# --- renders ---------------------------------------------------------------------------------


class PngZip:
    """A render's frames as RGBA PNGs (`frame_00000.png`, ...) in one ZIP, written to a
    temporary file renamed on `close`; the same interface as `Outputs`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files = {"zip": path.name}
        self._tmp = path.with_name(f".{path.name}.partial")
        path.parent.mkdir(parents=True, exist_ok=True)
        # PNG is compressed already: stored entries cost no CPU and unzip anywhere.
        self._zip = zipfile.ZipFile(self._tmp, "w", compression=zipfile.ZIP_STORED)
        self._count = 0

    def write(self, image: np.ndarray | None, matte: np.ndarray) -> None:
        """`image`: straight RGBA (H, W, 4) uint8 (Compositor with webm output)."""
        if image is None or image.ndim != 3 or image.shape[2] != 4:
            raise ValueError("PngZip takes straight RGBA frames")
        buffer = io.BytesIO()
        Image.fromarray(image, "RGBA").save(buffer, "PNG")
        self._zip.writestr(f"frame_{self._count:05d}.png", buffer.getvalue())
        self._count += 1

    def close(self) -> None:
        self._zip.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        try:
            self._zip.close()
        finally:
            self._tmp.unlink(missing_ok=True)


def render_job(ctx: WorkerContext, job_id: str, backend: TritonBackend | None = None) -> None:
    """Render job `job_id`'s stored poses for its avatar (idempotent, like a reenactment)."""
    claimed = claim(ctx, job_id, "render")
    if claimed is None:
        return
    settings, store = ctx.settings, ctx.store
    params = claimed.params
    path = store.job_input_dir(claimed.tenant_id, job_id) / str(params["poses"])
    if not store.pull(path):
        raise JobFailure("no_poses", "the job's poses are gone")
    poses = np.load(path, allow_pickle=False).astype(np.float32)
    fps = float(params["fps"])
    reporter = Reporter(ctx, job_id)
    reporter.update(0.0, "rendering", force=True)
    condition = job_condition(ctx, claimed.tenant_id, claimed.avatar_id)
    own_backend = backend is None
    if backend is None:
        backend = TritonBackend(
            TritonConfig.from_settings(settings, max_batch=settings.reenact_batch)
        )
    folder = store.job_dir(claimed.tenant_id, job_id)
    try:
        size = backend.image_size()
        as_zip = params["output"] == "png_zip"
        options = ReenactOptions.model_validate(
            {"avatar_id": claimed.avatar_id, "output": "webm" if as_zip else "mp4"}
        )
        sink: PngZip | Outputs = (
            PngZip(folder / ZIP_FILE)
            if as_zip
            else Outputs(folder, options, fps, (size, size), None)
        )
        try:
            chunks = pose_chunks(backend, condition, poses, settings.reenact_batch)
            written = write_chunks(
                chunks, sink, Compositor(options, None, (size, size)), len(poses), size,
                reporter.update, 0.0,
            )  # fmt: skip
            if written is None:
                sink.abort()
                return
            sink.close()
        except BaseException:
            sink.abort()
            raise
    finally:
        if own_backend:
            backend.close()
    files = [folder / name for name in sink.files.values()]
    store.push(*files)
    result = {
        "files": sink.files,
        "frames": written,
        "fps": fps,
        "width": size,
        "height": size,
        "audio": False,
    }
    with session_scope(ctx.sessions) as session:
        applied = transition(
            session, job_id, JobStatus.SUCCEEDED, from_=JobStatus.RUNNING, stage="done",
            result=result,
        )  # fmt: skip
    if not applied:
        for file in files:
            file.unlink(missing_ok=True)
        store.drop(*files)
        return
    logger.info("job %s: rendered %d frames from poses", job_id, written)


# --- the reenact queue's one task ------------------------------------------------------------

STAGES: Final[dict[JobKind, Callable[[WorkerContext, str], None]]] = {
    JobKind.REENACT: reenact_job,
    JobKind.POSE_TRACK: pose_track_job,
    JobKind.RENDER: render_job,
}


def run_reenact_queue_job(ctx: WorkerContext, job_id: str) -> None:
    """The stage of job `job_id` by its kind: the reenact queue's task runs all three (they
    share the GPU worker's Triton client settings, limits and retry policy)."""
    with session_scope(ctx.sessions) as session:
        kind = session.scalar(select(Job.kind).where(Job.id == job_id))
    if kind is None:
        return  # deleted (e.g. its enqueue failed after the publish)
    stage = STAGES.get(kind)
    if stage is None:
        logger.error("job %s: a %s job on the reenact queue; ignored", job_id, kind.value)
        return
    stage(ctx, job_id)
