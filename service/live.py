"""Real-time reenactment, one webcam frame at a time: the non-HTTP half of
`WS /v1/avatars/{id}/stream` (service/api/routes/stream.py), which holds the protocol.

Per frame: JPEG -> face box (smoothed per connection, held through misses) -> crop -> Triton
`reenact` (batch 1) -> the crop, or pasted back into the frame -> JPEG. `LatestFrame` sits
between receiving and processing so a slow server drops old frames instead of queueing them.
Pose mode (`PoseSession`): the client encodes its own crops and sends float16 pose
descriptors; the server runs only the generator.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections import Counter as Tally
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, ValidationError

from media.crop import crop_face, paste_back
from media.errors import MediaError
from media.faces import FaceDetector
from media.geometry import Box
from media.smoothing import BoxSmoother
from service.condition import Condition
from service.triton import PoseRenderer, Renderer

# --- close codes (4xxx mirror the HTTP statuses; 1011 and 1013 are RFC 6455's) ---------------

CLOSE_BAD_REQUEST: Final = 4400
CLOSE_UNAUTHORIZED: Final = 4401
CLOSE_NOT_FOUND: Final = 4404
CLOSE_IDLE: Final = 4408
CLOSE_NOT_READY: Final = 4409
CLOSE_VERSION_MISMATCH: Final = 4412
CLOSE_TOO_MANY_STREAMS: Final = 4429
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_TRY_AGAIN_LATER: Final = 1013

# Latency buckets for a real-time frame: a 25 fps stream has 40 ms per frame.
_LATENCY_BUCKETS: Final = (0.01, 0.02, 0.04, 0.06, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0)
# Pose descriptors are O(1) (the demo's reach about 4); far beyond is a client bug, not a pose.
MAX_POSE_VALUE: Final = 1e4
StreamMode = Literal["frames", "pose"]


class StreamRefused(Exception):
    """The stream cannot start: close the socket with `code` (one of the CLOSE_* above)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


class FrameError(Exception):
    """One client message is unusable; the stream answers with an error and goes on."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# What a stream needs from inference: service.triton.TritonBackend (fakes in tests).
StreamBackend = Renderer


class LiveBackend(Renderer, PoseRenderer, Protocol):
    """What a stream of either mode needs (service.triton.TritonBackend; fakes in tests)."""


# --- client messages -------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamOptions:
    """What the client asked for with `{"type": "config", ...}` messages."""

    paste_back: bool = False  # False: the reenacted S x S crop; True: the whole input frame
    format: Literal["jpeg"] = "jpeg"


class _ConfigMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["config"]
    paste_back: bool | None = None
    format: Literal["jpeg"] | None = None


def apply_config(text: str, options: StreamOptions, mode: StreamMode = "frames") -> StreamOptions:
    """Options after a text control message; fields it leaves out keep their values.

    Pose mode refuses `paste_back: true`: there is no frame to paste into."""
    try:
        message = _ConfigMessage.model_validate_json(text)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "message"
        raise FrameError(
            "bad_message",
            'text messages must be {"type": "config", "paste_back": bool, "format": "jpeg"}; '
            f"{where}: {first.get('msg', 'invalid')}",
        ) from None
    if mode == "pose" and message.paste_back:
        raise FrameError(
            "bad_message", "paste_back is not available in pose mode: there is no frame"
        )
    changes = message.model_dump(exclude_unset=True, exclude={"type"})
    return replace(options, **{k: v for k, v in changes.items() if v is not None})


def decode_pose(data: bytes, dim: int) -> np.ndarray:
    """One pose descriptor message -> float32 (1, dim); FrameError `bad_pose_size` or
    `bad_pose_values` otherwise."""
    expected = 2 * dim
    if len(data) != expected:
        hint = ""
        if len(data) == 4 * dim:
            hint = " (that is float32-sized: convert the descriptor to float16)"
        raise FrameError(
            "bad_pose_size",
            f"a pose descriptor is {dim} little-endian float16 values = {expected} bytes, "
            f"got {len(data)}{hint}",
        )
    pose = np.frombuffer(data, dtype="<f2").astype(np.float32)[None]  # (1, D)
    if not np.isfinite(pose).all():
        raise FrameError("bad_pose_values", "the pose descriptor contains NaN or infinity")
    if np.abs(pose).max() > MAX_POSE_VALUE:
        raise FrameError(
            "bad_pose_values",
            f"pose descriptor values must be within +-{MAX_POSE_VALUE:g}; is it float16?",
        )
    return pose


def decode_jpeg(data: bytes, max_pixels: int) -> np.ndarray:
    """A JPEG as (H, W, 3) uint8 RGB; FrameError `frame_too_large` / `not_a_jpeg` otherwise.

    The declared size is checked before decoding, so a small file claiming a huge image
    (a decompression bomb) costs nothing.
    """
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise FrameError(
                    "frame_too_large",
                    f"a frame may have at most {max_pixels} pixels, got {width}x{height}",
                )
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError:
        raise FrameError("frame_too_large", "the frame's declared size is too large") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError):
        raise FrameError("not_a_jpeg", "a binary message must be one JPEG image") from None


def encode_jpeg(rgb: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# --- latest frame wins -----------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One binary client message: its index among them, its bytes, when it arrived."""

    seq: int
    data: bytes
    received: float  # time.monotonic()


class LatestFrame:
    """A one-slot mailbox: `put` replaces a frame not yet taken (a drop), `take` waits.

    Not thread-safe: the receiving and processing coroutines share one event loop.
    """

    def __init__(self) -> None:
        self._frame: Frame | None = None
        self._ready = asyncio.Event()
        self.dropped = 0

    def put(self, frame: Frame) -> bool:
        """Hold `frame`; True if it replaced (dropped) an unprocessed one."""
        dropped = self._frame is not None
        self.dropped += int(dropped)
        self._frame = frame
        self._ready.set()
        return dropped

    async def take(self) -> Frame:
        """The newest frame, waiting for one if the slot is empty."""
        await self._ready.wait()
        self._ready.clear()
        frame, self._frame = self._frame, None
        assert frame is not None
        return frame


# --- one connection's frames -----------------------------------------------------------------


@dataclass(frozen=True)
class Reply:
    """What one frame turned into."""

    face: bool  # a face was detected in this frame
    image: bytes | None  # JPEG; None while no face has been seen on this connection yet
    render_ms: float | None = None  # pose mode: the generator call


class LiveSession:
    """One connection's renderer: who to render, at what size, and the smoothed crop box.

    Not thread-safe: a connection processes one frame at a time.
    """

    def __init__(
        self,
        backend: StreamBackend,
        detector: FaceDetector,
        condition: Condition,
        image_size: int,
        *,
        jpeg_quality: int,
        max_pixels: int,
    ) -> None:
        self.backend = backend
        self.detector = detector
        self.condition = condition
        self.image_size = image_size
        self.jpeg_quality = jpeg_quality
        self.max_pixels = max_pixels
        self.smoother = BoxSmoother()

    def _box(self, rgb: np.ndarray, t: float) -> tuple[Box | None, bool]:
        try:
            detected: Box | None = self.detector.crop_box(rgb)
        except MediaError:  # no face: the smoother holds the last box
            detected = None
        return self.smoother.update(detected, t), detected is not None

    def process(self, frame: Frame, options: StreamOptions) -> Reply:
        """Decode, crop, reenact and encode one frame (blocking: run it in a worker thread).

        Raises FrameError for a bad JPEG and `service.triton.TritonError` from inference.
        """
        rgb = decode_jpeg(frame.data, self.max_pixels)
        box, detected = self._box(rgb, frame.received)
        if box is None:
            return Reply(face=False, image=None)
        try:
            crop = crop_face(rgb, box, self.image_size)
        except ValueError:  # the held box lies outside this (differently sized) frame
            return Reply(face=detected, image=None)
        driving = np.ascontiguousarray(crop.image.transpose(2, 0, 1)[None])  # (1, 3, S, S)
        cond = self.condition
        rendered = self.backend.reenact(driving, identity=cond.identity, avatar_id=cond.avatar_id)
        if options.paste_back:
            colour = rendered.rgb[0].transpose(1, 2, 0)  # (S, S, 3) premultiplied
            out = paste_back(rgb, colour, rendered.mask[0, 0], crop.transform)
        else:
            out = rendered.to_uint8()[0][0]  # premultiplied: the generator's black background
        return Reply(face=detected, image=encode_jpeg(out, self.jpeg_quality))


class PoseSession:
    """One pose-mode connection: descriptors in, the avatar rendered by the generator out."""

    def __init__(
        self, backend: PoseRenderer, condition: Condition, pose_dim: int, *, jpeg_quality: int
    ) -> None:
        self.backend = backend
        self.condition = condition
        self.pose_dim = pose_dim
        self.jpeg_quality = jpeg_quality

    def check(self, data: bytes) -> None:
        """FrameError unless `data` is one usable descriptor (cheap: done on receipt, so a bad
        message never displaces a good one waiting)."""
        decode_pose(data, self.pose_dim)

    def process(self, frame: Frame, options: StreamOptions) -> Reply:
        """Render one descriptor and encode it (blocking: run it in a worker thread).

        Raises FrameError for a bad descriptor and `service.triton.TritonError` from inference.
        """
        pose = decode_pose(frame.data, self.pose_dim)
        cond = self.condition
        start = time.perf_counter()
        rendered = self.backend.render(pose, identity=cond.identity, avatar_id=cond.avatar_id)
        render_ms = 1000 * (time.perf_counter() - start)
        out = rendered.to_uint8()[0][0]  # premultiplied: the generator's black background
        image = encode_jpeg(out, self.jpeg_quality)
        return Reply(face=True, image=image, render_ms=round(render_ms, 2))


# --- per-process bookkeeping -----------------------------------------------------------------


class LiveStreams:
    """Open streams per tenant (this process only) and the stream metrics, in the app's
    Prometheus registry."""

    def __init__(self, registry: CollectorRegistry, max_per_tenant: int) -> None:
        self.max_per_tenant = max_per_tenant
        self._open: Tally[str] = Tally()
        self.latency = Histogram(
            "lpd_stream_frame_latency_seconds",
            "Stream frames: from receipt to the reply being sent (decode, detect, reenact, "
            "encode, and any wait for the frame before it).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.dropped = Counter(
            "lpd_stream_frames_dropped_total",
            "Stream frames replaced by a newer one before they were processed.",
            registry=registry,
        )
        self.streams = Gauge("lpd_streams_open", "Open real-time streams.", registry=registry)

    def open(self, tenant_id: str) -> bool:
        """Count a new stream of `tenant_id`; False (nothing counted) if it has too many."""
        if self._open[tenant_id] >= self.max_per_tenant:
            return False
        self._open[tenant_id] += 1
        self.streams.inc()
        return True

    def close(self, tenant_id: str) -> None:
        self._open[tenant_id] -= 1
        if self._open[tenant_id] <= 0:
            del self._open[tenant_id]
        self.streams.dec()

    def observe(self, frame: Frame, now: float | None = None) -> float:
        """Record a reply to `frame`; its latency in seconds."""
        latency = (time.monotonic() if now is None else now) - frame.received
        self.latency.observe(latency)
        return latency
