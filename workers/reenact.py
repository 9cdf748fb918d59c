"""The reenact stage: a driver (video or stored pose track) -> the avatar performing it,
through Triton.

A driver video takes two passes, so that memory stays flat for any length:
1. decode + detect the face in every frame, then smooth the track offline (media.smoothing:
   the official x1.8 square crop, held through missed detections);
2. decode again, crop, send `reenact_batch` crops at a time to Triton's `reenact` model (pose
   encoder + generator), compose each output frame as asked, and encode the result with the
   driver's audio plus the matte.

A stored pose track (workers.pose_tracks made it with the same pass 1 and the pose encoder)
skips both: its descriptors go `reenact_batch` at a time to the `generator` alone, and the
driver video is decoded only when paste-back needs its frames. Both paths share the
compositing and encoding (`write_chunks`), so a track reproduces the file's video.

Encoders write to temporary files renamed on success, so a failed, canceled or killed job
leaves no half-written result; a retried job renders from the start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import cv2
import numpy as np
from sqlalchemy import select

from media.crop import composite, crop_face, unpremultiply, warp_to_frame
from media.errors import MediaError
from media.faces import shared_detector
from media.geometry import Box, CropTransform
from media.smoothing import smooth_boxes
from media.video import MASK_MP4, MP4_H264, WEBM_VP9_ALPHA, Frame, VideoWriter, read_frames
from service.condition import Condition, avatar_condition
from service.db import session_scope
from service.jobs import transition
from service.models import Avatar, JobStatus, PoseTrack
from service.pose_tracks import (
    AUDIO,
    DESCRIPTORS,
    VIDEO,
    TrackData,
    encoder_fingerprint,
    load_track,
    track_dir,
)
from service.schemas import ReenactOptions
from service.triton import PoseRenderer, Rendered, Renderer, TritonBackend, TritonConfig
from service.uploads import load_photo
from workers.runtime import Claimed, JobFailure, Reporter, WorkerContext, claim

logger = logging.getLogger(__name__)

# fraction of the job done, stage -> False to stop (the job was canceled)
Progress = Callable[[float, str], bool]


TRACK_SHARE: Final = 0.3  # of the progress bar: pass 1 (decode + detect)
FILES: Final = {"mp4": "video.mp4", "webm": "video.webm"}
MASK_FILE: Final = "mask.mp4"


def job_condition(ctx: WorkerContext, tenant_id: str, avatar_id: str) -> Condition:
    """The avatar's condition for Triton (service.condition), or a typed failure."""
    with session_scope(ctx.sessions) as session:
        avatar = session.scalar(
            select(Avatar).where(Avatar.id == avatar_id, Avatar.tenant_id == tenant_id)
        )
        if avatar is None:
            raise JobFailure("avatar_not_found", "the avatar was deleted")
        condition = avatar_condition(avatar, ctx.store, ctx.settings.served_avatars_dir)
    if condition is None:
        raise JobFailure("avatar_not_ready", "the avatar has no identity yet")
    return condition


def _frames(video: Path) -> Iterator[Frame]:
    """Driver frames; a file that breaks off part-way fails the job (typed), not the task."""
    try:
        yield from read_frames(video)
    except MediaError as exc:
        raise JobFailure("truncated_video", f"the driver video cannot be decoded: {exc}") from exc


@dataclass(frozen=True)
class FaceTrack:
    """Pass 1's result, one entry per decoded driver frame."""

    boxes: list[Box]  # smoothed square crop boxes (held through missed detections)
    faces: list[bool]  # whether a face was detected in the frame itself
    times: list[float]  # presentation times, seconds


def detect_faces(video: Path, total: int, report: Progress) -> FaceTrack | None:
    """Pass 1: detect, then smooth; None if `report` says stop (canceled)."""
    boxes: list[Box | None] = []
    times: list[float] = []
    for frame in _frames(video):
        faces = shared_detector().detect(frame.image)
        boxes.append(faces[0].box.square(shared_detector().config.box_scale) if faces else None)
        times.append(frame.time)
        if not report(len(boxes) / max(total, len(boxes)) * TRACK_SHARE, "tracking"):
            return None
    if not any(boxes):
        raise JobFailure("no_face", "no face was found in the driver video")
    return FaceTrack(smooth_boxes(boxes, times), [b is not None for b in boxes], times)


def track_faces(video: Path, total: int, report: Progress) -> list[Box] | None:
    """One smoothed crop box per driver frame; None if `report` says stop (canceled)."""
    track = detect_faces(video, total, report)
    return None if track is None else track.boxes


class Compositor:
    """Turns generated crops into output frames per the job's options."""

    def __init__(
        self, options: ReenactOptions, background: np.ndarray | None, size: tuple[int, int]
    ) -> None:
        self.options = options
        self.background: tuple[int, int, int] | np.ndarray | None = None
        if options.background == "color":
            self.background = options.rgb()
        elif options.background == "image" and background is not None:
            # Once, not per frame: an uploaded background may have 40 MP.
            self.background = cv2.resize(background, size, interpolation=cv2.INTER_AREA)

    def frame(
        self, driver: Frame | None, rgb: np.ndarray, mask: np.ndarray, box: Box | None, size: int
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(video frame or None for mask-only output, matte (H, W) uint8).

        rgb: (S, S, 3) float premultiplied by mask (S, S). `driver` and `box` are needed for
        paste-back only."""
        opts = self.options
        if opts.paste_back:
            if driver is None or box is None:
                raise ValueError("paste_back needs the driver frame and its crop box")
            h, w = driver.image.shape[:2]
            transform = CropTransform.from_box(box, size)
            colour, alpha = warp_to_frame(rgb, mask, transform, (w, h))
        else:
            colour, alpha = rgb, mask
        matte = _to_uint8(alpha)
        if opts.output == "mask":
            return None, matte
        if opts.output == "webm":
            return unpremultiply(colour, alpha), matte
        if opts.paste_back:
            assert driver is not None
            out = colour * 255 + (1 - alpha[..., None]) * driver.image.astype(np.float32)
            return np.clip(out, 0, 255).round().astype(np.uint8), matte
        if self.background is None:  # the generator's own (black) background
            return _to_uint8(colour), matte
        return composite(colour, alpha, self.background), matte


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(x * 255.0 + 0.5, 0, 255).astype(np.uint8)


class Outputs:
    """The job's encoders: the requested video (if any) and the matte, side by side."""

    def __init__(
        self,
        folder: Path,
        options: ReenactOptions,
        fps: float,
        size: tuple[int, int],
        audio: Path | None,
    ) -> None:
        w, h = size
        self.files: dict[str, str] = {}
        self.video: VideoWriter | None = None
        if options.output != "mask":
            fmt = WEBM_VP9_ALPHA if options.output == "webm" else MP4_H264
            name = FILES[options.output]
            self.video = VideoWriter(folder / name, fps, w, h, fmt, audio_from=audio)
            self.files["video"] = name
        try:
            self.mask = VideoWriter(folder / MASK_FILE, fps, w, h, MASK_MP4)
        except BaseException:
            if self.video is not None:
                self.video.abort()
            raise
        self.files["mask"] = MASK_FILE

    def write(self, image: np.ndarray | None, matte: np.ndarray) -> None:
        if self.video is not None and image is not None:
            self.video.write(image)
        self.mask.write(matte)

    def close(self) -> None:
        """Finish both files, or neither (a failed flush aborts the other one too)."""
        try:
            if self.video is not None:
                self.video.close()
                self.video = None
            self.mask.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for writer in (self.video, self.mask):
            if writer is not None:
                writer.abort()


def crop_batches(
    video: Path, boxes: list[Box], size: int, batch: int
) -> Iterator[tuple[list[Frame], list[Box], np.ndarray]]:
    """Driver frames with their boxes and (N, 3, S, S) uint8 crops, `batch` at a time."""
    frames: list[Frame] = []
    for frame in _frames(video):
        frames.append(frame)
        if len(frames) == batch:
            yield _crops(frames, boxes, size)
            frames = []
    if frames:
        yield _crops(frames, boxes, size)


def _crops(
    frames: list[Frame], boxes: list[Box], size: int
) -> tuple[list[Frame], list[Box], np.ndarray]:
    chosen = [boxes[min(f.index, len(boxes) - 1)] for f in frames]
    crops = [crop_face(f.image, b, size).image for f, b in zip(frames, chosen, strict=True)]
    return frames, chosen, np.ascontiguousarray(np.stack(crops).transpose(0, 3, 1, 2))


class FrameSink(Protocol):
    """Where composed frames go: `Outputs` (videos) or a render's PNG ZIP."""

    def write(self, image: np.ndarray | None, matte: np.ndarray) -> None: ...


@dataclass(frozen=True)
class Chunk:
    """Up to one batch of generated frames, with what compositing them may need."""

    rendered: Rendered
    boxes: list[Box] | None  # crop boxes in driver pixels (paste-back)
    frames: list[Frame] | None  # the decoded driver frames (paste-back)


def video_chunks(
    backend: Renderer, condition: Condition, video: Path, boxes: list[Box], batch: int
) -> Iterator[Chunk]:
    """Pass 2 of a driver video: crops through Triton's `reenact` (pose encoder + generator
    in one call)."""
    size = backend.image_size()
    for frames, chosen, crops in crop_batches(video, boxes, size, batch):
        out = backend.reenact(crops, identity=condition.identity, avatar_id=condition.avatar_id)
        yield Chunk(out, chosen, frames)


def pose_chunks(
    backend: PoseRenderer,
    condition: Condition,
    poses: np.ndarray,
    batch: int,
    boxes: list[Box] | None = None,
    video: Path | None = None,
) -> Iterator[Chunk]:
    """Stored poses (T, D) through the `generator` alone; the driver `video` (with `boxes`)
    is decoded alongside only when given, i.e. for paste-back."""
    frames = _frames(video) if video is not None else None
    for start in range(0, len(poses), batch):
        part = np.ascontiguousarray(poses[start : start + batch], dtype=np.float32)
        out = backend.render(part, identity=condition.identity, avatar_id=condition.avatar_id)
        driver = None
        if frames is not None:
            driver = [f for _, f in zip(range(len(part)), frames, strict=False)]
            if len(driver) != len(part):
                raise JobFailure("truncated_video", "the driver video has fewer frames than poses")
        chosen = boxes[start : start + len(part)] if boxes is not None else None
        yield Chunk(out, chosen, driver)


def write_chunks(
    chunks: Iterator[Chunk],
    sink: FrameSink,
    compositor: Compositor,
    total: int,
    size: int,
    report: Progress,
    start: float = TRACK_SHARE,
) -> int | None:
    """Compose and write every chunk's frames; the number written, or None if the job was
    canceled. Progress runs from `start` to 1 over `total` frames."""
    written = 0
    for chunk in chunks:
        rgb = chunk.rendered.rgb.transpose(0, 2, 3, 1)
        for i in range(len(chunk.rendered)):
            driver = chunk.frames[i] if chunk.frames is not None else None
            box = chunk.boxes[i] if chunk.boxes is not None else None
            sink.write(*compositor.frame(driver, rgb[i], chunk.rendered.mask[i, 0], box, size))
        written += len(chunk.rendered)
        if not report(start + (1 - start) * written / max(total, written), "rendering"):
            return None
    return written


def render(
    backend: Renderer,
    condition: Condition,
    video: Path,
    boxes: list[Box],
    outputs: Outputs,
    compositor: Compositor,
    batch: int,
    report: Progress,
) -> int | None:
    """Pass 2: the number of frames written, or None if the job was canceled."""
    chunks = video_chunks(backend, condition, video, boxes, batch)
    return write_chunks(chunks, outputs, compositor, len(boxes), backend.image_size(), report)


def _background(claimed: Claimed, ctx: WorkerContext) -> np.ndarray | None:
    name = claimed.params.get("background_image")
    if not name:
        return None
    path = ctx.store.job_input_dir(claimed.tenant_id, claimed.id) / str(name)
    ctx.store.pull(path)
    return load_photo(path, ctx.settings.max_photo_pixels)


def _encode(
    ctx: WorkerContext,
    claimed: Claimed,
    options: ReenactOptions,
    size: int,
    chunks: Iterator[Chunk],
    total: int,
    audio: Path | None,
    reporter: Reporter,
    start: float = TRACK_SHARE,
) -> tuple[Path, Outputs, int, tuple[int, int], bool] | None:
    """Compose and encode `chunks` into the job's folder: (folder, outputs, frames, frame
    size, audio kept), or None if the job was canceled; nothing half-written is left."""
    driver = claimed.params["driver"]
    paste = options.paste_back
    frame_size = (int(driver["width"]), int(driver["height"])) if paste else (size, size)
    keep_audio = (
        options.keep_audio
        and bool(driver.get("audio"))
        and options.output != "mask"
        and audio is not None
    )
    folder = ctx.store.job_dir(claimed.tenant_id, claimed.id)
    outputs = Outputs(
        folder, options, float(driver["fps"]), frame_size, audio if keep_audio else None
    )
    try:
        compositor = Compositor(options, _background(claimed, ctx), frame_size)
        written = write_chunks(chunks, outputs, compositor, total, size, reporter.update, start)
        if written is None:
            outputs.abort()
            return None
        outputs.close()
    except BaseException:
        outputs.abort()
        raise
    return folder, outputs, written, frame_size, keep_audio


def reenact_job(ctx: WorkerContext, job_id: str, backend: TritonBackend | None = None) -> None:
    """Run reenactment job `job_id` (idempotent; see workers.runtime). `backend`: a Triton
    client to reuse; by default one is made from the settings and closed afterwards."""
    claimed = claim(ctx, job_id, "reenact")
    if claimed is None:
        return
    settings, store = ctx.settings, ctx.store
    options = ReenactOptions.model_validate(
        {k: claimed.params[k] for k in ReenactOptions.model_fields if k in claimed.params}
    )
    driver = claimed.params["driver"]
    reporter = Reporter(ctx, job_id)
    reporter.update(0.0, "loading" if options.pose_track_id else "tracking", force=True)
    condition = job_condition(ctx, claimed.tenant_id, claimed.avatar_id)
    if options.pose_track_id is not None:
        drive: Drive | None = _track_drive(ctx, claimed, options)
    else:
        drive = _video_drive(ctx, claimed, reporter)
    if drive is None:  # canceled while tracking
        return
    own_backend = backend is None
    if backend is None:
        backend = TritonBackend(
            TritonConfig.from_settings(settings, max_batch=settings.reenact_batch)
        )
    batch = settings.reenact_batch
    try:
        if drive.poses is not None:
            chunks = pose_chunks(backend, condition, drive.poses, batch, drive.boxes, drive.video)
        else:
            assert drive.video is not None
            assert drive.boxes is not None
            chunks = video_chunks(backend, condition, drive.video, drive.boxes, batch)
        encoded = _encode(
            ctx, claimed, options, backend.image_size(), chunks, drive.frames, drive.audio,
            reporter, drive.progress_start,
        )  # fmt: skip
    finally:
        if own_backend:
            backend.close()
    if encoded is None:  # canceled
        return
    folder, outputs, written, frame_size, audio_kept = encoded
    files = [folder / name for name in outputs.files.values()]
    store.push(*files)  # before the job says they exist: a client may download at once
    result = {
        "files": outputs.files,
        "frames": written,
        "fps": float(driver["fps"]),
        "width": frame_size[0],
        "height": frame_size[1],
        "audio": audio_kept,
    }
    with session_scope(ctx.sessions) as session:
        applied = transition(
            session,
            job_id,
            JobStatus.SUCCEEDED,
            from_=JobStatus.RUNNING,
            stage="done",
            result=result,
        )
    if not applied:  # canceled in the last moment: its files go too
        for file in files:
            file.unlink(missing_ok=True)
        store.drop(*files)
        return
    logger.info("job %s: rendered %d frames", job_id, written)


# --- what drives a job ----------------------------------------------------------------------


@dataclass(frozen=True)
class Drive:
    """A job's driver, ready for pass 2: a video to crop and encode (`poses` None), or
    stored poses (with the video and boxes only if paste-back needs them)."""

    frames: int
    video: Path | None
    boxes: list[Box] | None
    poses: np.ndarray | None  # (T, D) float32
    audio: Path | None  # where the driver's audio is copied from
    progress_start: float  # the share of the progress bar already done


def _video_drive(ctx: WorkerContext, claimed: Claimed, reporter: Reporter) -> Drive | None:
    """The uploaded driver video after pass 1; None if canceled meanwhile."""
    video = ctx.store.job_input_dir(claimed.tenant_id, claimed.id) / str(claimed.params["video"])
    if not ctx.store.pull(video):  # uploaded to another host: the bucket has it
        raise JobFailure("no_video", "the driver video is gone")
    boxes = track_faces(video, int(claimed.params["driver"]["frames"]), reporter.update)
    if boxes is None:
        return None
    return Drive(len(boxes), video, boxes, None, video, TRACK_SHARE)


def _track_drive(ctx: WorkerContext, claimed: Claimed, options: ReenactOptions) -> Drive:
    """A stored pose track: no decoding unless paste-back needs the frames."""
    assert options.pose_track_id is not None
    source = load_track_source(
        ctx, claimed.tenant_id, options.pose_track_id, need_video=options.paste_back
    )
    boxes = source.boxes if options.paste_back else None
    poses = source.data.poses
    return Drive(len(poses), source.video, boxes, poses, source.audio, 0.0)


# --- driving from a stored pose track --------------------------------------------------------


@dataclass(frozen=True)
class TrackSource:
    """A pose track's files on this host, ready to drive a job."""

    data: TrackData
    audio: Path | None
    video: Path | None

    @property
    def boxes(self) -> list[Box]:
        return [Box(*(float(v) for v in row)) for row in self.data.boxes]


def load_track_source(
    ctx: WorkerContext, tenant_id: str, track_id: str, *, need_video: bool
) -> TrackSource:
    """The track's descriptors (and audio, and video when `need_video`), pulled from the
    bucket if needed; typed failures if it is gone, expired or made by another encoder."""
    with session_scope(ctx.sessions) as session:
        track = session.scalar(
            select(PoseTrack).where(PoseTrack.id == track_id, PoseTrack.tenant_id == tenant_id)
        )
        if track is None:
            raise JobFailure("pose_track_not_found", "the pose track was deleted")
        encoder, has_audio, keep_video = track.encoder, track.audio, track.keep_video
    served = encoder_fingerprint(ctx.settings.base_checkpoint)
    if served is not None and encoder != served:
        raise JobFailure(
            "pose_track_stale",
            "the pose track was encoded by another pose encoder than the one served now",
        )
    folder = track_dir(ctx.store, tenant_id, track_id)
    if not ctx.store.pull(folder / DESCRIPTORS):
        raise JobFailure("pose_track_expired", "the pose track's files are gone")
    audio = folder / AUDIO if has_audio and ctx.store.pull(folder / AUDIO) else None
    video = None
    if need_video:
        if not keep_video or not ctx.store.pull(folder / VIDEO):
            raise JobFailure("pose_track_no_video", "the pose track did not keep its video")
        video = folder / VIDEO
    return TrackSource(load_track(folder / DESCRIPTORS), audio, video)
