"""The reenact stage: a driver video -> the avatar performing it, through Triton.

Two passes over the driver, so that memory stays flat for any length:
1. decode + detect the face in every frame, then smooth the track offline (media.smoothing:
   the official x1.8 square crop, held through missed detections);
2. decode again, crop, send `reenact_batch` crops at a time to Triton's `reenact` model (pose
   encoder + generator), compose each output frame as asked, and encode the result with the
   driver's audio plus the matte.

Encoders write to temporary files renamed on success, so a failed, canceled or killed job
leaves no half-written result; a retried job renders from the start.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

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
from service.models import Avatar, JobStatus
from service.schemas import ReenactOptions
from service.triton import Renderer, TritonBackend, TritonConfig
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


def track_faces(video: Path, total: int, report: Progress) -> list[Box] | None:
    """One smoothed crop box per driver frame; None if `report` says stop (canceled)."""
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
    return smooth_boxes(boxes, times)


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
        self, driver: Frame, rgb: np.ndarray, mask: np.ndarray, box: Box, size: int
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """(video frame or None for mask-only output, matte (H, W) uint8).

        rgb: (S, S, 3) float premultiplied by mask (S, S)."""
        opts = self.options
        if opts.paste_back:
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


def _batches(
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
    size = backend.image_size()
    written = 0
    for frames, chosen, crops in _batches(video, boxes, size, batch):
        out = backend.reenact(crops, identity=condition.identity, avatar_id=condition.avatar_id)
        rgb = out.rgb.transpose(0, 2, 3, 1)
        for i, frame in enumerate(frames):
            outputs.write(*compositor.frame(frame, rgb[i], out.mask[i, 0], chosen[i], size))
        written += len(frames)
        share = TRACK_SHARE + (1 - TRACK_SHARE) * written / len(boxes)
        if not report(share, "rendering"):
            return None
    return written


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
    backend: Renderer,
    condition: Condition,
    video: Path,
    boxes: list[Box],
    reporter: Reporter,
) -> tuple[Path, Outputs, int, tuple[int, int], bool] | None:
    """Pass 2 into the job's folder: (folder, outputs, frames, frame size, audio kept), or
    None if the job was canceled; nothing half-written is left either way."""
    driver = claimed.params["driver"]
    size = backend.image_size()
    paste = options.paste_back
    frame_size = (int(driver["width"]), int(driver["height"])) if paste else (size, size)
    keep_audio = options.keep_audio and bool(driver.get("audio")) and options.output != "mask"
    folder = ctx.store.job_dir(claimed.tenant_id, claimed.id)
    outputs = Outputs(
        folder, options, float(driver["fps"]), frame_size, video if keep_audio else None
    )
    try:
        compositor = Compositor(options, _background(claimed, ctx), frame_size)
        written = render(
            backend, condition, video, boxes, outputs, compositor,
            ctx.settings.reenact_batch, reporter.update,
        )  # fmt: skip
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
    inputs = store.job_input_dir(claimed.tenant_id, job_id)
    video = inputs / str(claimed.params["video"])
    if not store.pull(video):  # uploaded to another host: the bucket has it
        raise JobFailure("no_video", "the driver video is gone")
    reporter = Reporter(ctx, job_id)
    reporter.update(0.0, "tracking", force=True)
    condition = job_condition(ctx, claimed.tenant_id, claimed.avatar_id)

    boxes = track_faces(video, int(driver["frames"]), reporter.update)
    if boxes is None:
        return
    own_backend = backend is None
    if backend is None:
        backend = TritonBackend(
            TritonConfig.from_settings(settings, max_batch=settings.reenact_batch)
        )
    try:
        encoded = _encode(ctx, claimed, options, backend, condition, video, boxes, reporter)
    finally:
        if own_backend:
            backend.close()
    if encoded is None:  # canceled
        return
    folder, outputs, written, frame_size, audio = encoded
    files = [folder / name for name in outputs.files.values()]
    store.push(*files)  # before the job says they exist: a client may download at once
    result = {
        "files": outputs.files,
        "frames": written,
        "fps": float(driver["fps"]),
        "width": frame_size[0],
        "height": frame_size[1],
        "audio": audio,
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
