"""`WS /v1/avatars/{avatar_id}/stream`: real-time telepresence, webcam frames in, the avatar out.

Auth: `Authorization: Bearer <API key>`, or `?token=<API key>` for browsers (which cannot set
WebSocket headers; the query string may reach access logs, so prefer the header). A bad key
closes the socket *before* accepting it with 4401: ASGI servers turn that into a refused
handshake (uvicorn answers HTTP 403), in-process clients see 4401. Once authenticated, the
socket is accepted and closed with 4404 (no such avatar, or another tenant's), 4409 (avatar
not ready), 4429 (more than `max_streams_per_tenant` streams) or 4408 (no client message for
`stream_idle_timeout_s`). Inference unavailable: an error message, then close 1013 (try
again later); any other inference failure: an error message, then close 1011.

Client -> server:
- binary: one JPEG frame (at most `max_stream_frame_bytes` and `max_stream_frame_pixels`);
  `seq` counts binary messages from 0.
- text: `{"type": "config", "paste_back": bool, "format": "jpeg"}` (fields optional, they
  apply from the next processed frame); acknowledged with the effective `{"type": "config",
  ...}`.

Server -> client, per processed frame: text `{"type": "frame", "seq": n, "latency_ms": x,
"dropped": k, "face": bool, "image": bool}`, then, if `image`, one binary JPEG: the
reenacted S x S crop (on black), or the whole input frame with it pasted back. `latency_ms`
runs from receipt to this reply; `dropped` counts this connection's frames replaced by a
newer one before processing (latest frame wins: at most one frame waits). `face`: a face was
detected in this frame; without one the last box is reused, and before the first one
`image` is false and no binary follows (the client's own face is never echoed).
A message that cannot be used gets `{"type": "error", "code", "message", "seq"?}` (codes
`frame_too_large`, `not_a_jpeg`, `bad_message`) and the stream goes on.

Pose mode, `?mode=pose&version=V` (`mode=frames` is the default above): the client crops and
encodes its own frames with the pose encoder of `GET /v1/models/pose-encoder` (the contract:
crop rule, ONNX files, `version`) and the server runs only the generator. Same auth, close
codes, rate limit, idle timeout and latest-frame-wins; besides, a `version` other than the
contract's closes the socket with 4412 (download the contract again; no `version`: trusted),
an unknown `mode` with 4400.
- binary: one pose descriptor, exactly 2 x D bytes of little-endian float16 (D = the
  contract's `pose_dim`); `seq` counts binary messages from 0, unusable ones included.
- text: the config message as above; `paste_back: true` is refused (`bad_message`).
- reply per processed descriptor: `{"type": "frame", "seq", "latency_ms", "dropped",
  "face": true, "image": true, "render_ms"}` (`render_ms`: the generator call), then the
  S x S render as one binary JPEG (premultiplied, on black).
- errors, and the stream goes on: `bad_pose_size` (length is not 2 x D; the message says so
  when it is float32-sized), `bad_pose_values` (NaN, infinity, or |x| > 1e4), `bad_message`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from typing import Any

import anyio
from anyio import CancelScope
from fastapi import APIRouter, WebSocket
from starlette.concurrency import run_in_threadpool
from starlette.types import Message
from starlette.websockets import WebSocketDisconnect, WebSocketState

from media.faces import shared_detector
from service.api.deps import InferenceDep
from service.api.routes.avatars import get_avatar_or_404
from service.auth import AuthenticationError, authenticate
from service.condition import Condition, avatar_condition
from service.config import Settings
from service.db import session_scope
from service.errors import ApiError
from service.live import (
    CLOSE_BAD_REQUEST,
    CLOSE_IDLE,
    CLOSE_INTERNAL_ERROR,
    CLOSE_NOT_FOUND,
    CLOSE_NOT_READY,
    CLOSE_TOO_MANY_STREAMS,
    CLOSE_TRY_AGAIN_LATER,
    CLOSE_UNAUTHORIZED,
    CLOSE_VERSION_MISMATCH,
    Frame,
    FrameError,
    LatestFrame,
    LiveBackend,
    LiveSession,
    LiveStreams,
    PoseSession,
    StreamMode,
    StreamOptions,
    StreamRefused,
    apply_config,
)
from service.models import AvatarStatus
from service.pose_encoder import PoseEncoderInfo, PoseEncoderUnavailable, checkpoint_info
from service.ratelimit import enforce_rate_limit
from service.triton import InferenceUnavailable, ModelNotReady, TritonError

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/avatars", tags=["stream"])


class _Closed(Exception):
    """End the stream: send `error` (if any), then close the socket with `code`."""

    def __init__(self, code: int, reason: str = "", error: dict[str, Any] | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.error = error


def _admit(
    websocket: WebSocket, authorization: str | None, avatar_id: str, settings: Settings
) -> tuple[str, Condition]:
    """(tenant id, the avatar's condition for Triton); StreamRefused with its close code.

    Opening a stream counts against the key's rate limit, like any request."""
    app: Any = websocket.app
    with session_scope(app.state.sessions) as session:
        try:
            principal = authenticate(session, authorization)
        except AuthenticationError as exc:
            raise StreamRefused(CLOSE_UNAUTHORIZED, str(exc)) from None
        try:
            enforce_rate_limit(websocket, principal, settings)
        except ApiError as exc:
            close = CLOSE_TOO_MANY_STREAMS if exc.status == 429 else CLOSE_TRY_AGAIN_LATER
            raise StreamRefused(close, exc.message) from None
        try:
            avatar = get_avatar_or_404(session, principal, avatar_id)
        except ApiError:
            raise StreamRefused(CLOSE_NOT_FOUND, "no such avatar") from None
        condition = avatar_condition(avatar, app.state.store, settings.served_avatars_dir)
        if avatar.status is not AvatarStatus.READY or condition is None:
            raise StreamRefused(CLOSE_NOT_READY, f"the avatar is {avatar.status.value}")
        return principal.tenant_id, condition


def _inference_failure(exc: TritonError, seq: int | None = None) -> _Closed:
    """1013 with the adapter's code when Triton is down or loading, else 1011; like the HTTP
    handlers, the message names no internals (they are logged)."""
    if isinstance(exc, InferenceUnavailable | ModelNotReady):
        logger.warning("stream: inference unavailable: %s", exc)
        code, close = exc.code, CLOSE_TRY_AGAIN_LATER
        message = "the inference server is unavailable; try again later"
    else:
        logger.error("stream: inference failed: %s", exc)
        code, close, message = "internal_error", CLOSE_INTERNAL_ERROR, "internal server error"
    error: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if seq is not None:
        error["seq"] = seq
    return _Closed(close, message, error)


class _Stream:
    """One connection: a receiving and a processing coroutine around a `LatestFrame`."""

    def __init__(
        self,
        websocket: WebSocket,
        settings: Settings,
        live: LiveStreams,
        session: LiveSession | PoseSession,
    ) -> None:
        self.ws = websocket
        self.settings = settings
        self.live = live
        self.session = session
        self.mode: StreamMode = "pose" if isinstance(session, PoseSession) else "frames"
        self.options = StreamOptions()
        self.slot = LatestFrame()
        self.send_lock = asyncio.Lock()  # a frame's header and JPEG must stay adjacent

    async def send_error(self, code: str, message: str, seq: int | None = None) -> None:
        body: dict[str, Any] = {"type": "error", "code": code, "message": message}
        if seq is not None:
            body["seq"] = seq
        async with self.send_lock:
            await self.ws.send_text(json.dumps(body))

    def check(self, data: bytes) -> FrameError | None:
        """Why a binary message cannot be used, found on receipt (size, pose values), or None."""
        if isinstance(self.session, PoseSession):
            try:
                self.session.check(data)
            except FrameError as exc:
                return exc
        elif len(data) > self.settings.max_stream_frame_bytes:
            limit = self.settings.max_stream_frame_bytes
            return FrameError("frame_too_large", f"a frame may be at most {limit} bytes")
        return None

    async def receive(self) -> None:
        """Read client messages until the client leaves; _Closed on idling."""
        seq = 0
        while True:
            message: Message | None = None
            with anyio.move_on_after(self.settings.stream_idle_timeout_s):
                message = await self.ws.receive()
            if message is None:
                raise _Closed(CLOSE_IDLE, "idle")
            if message["type"] == "websocket.disconnect":
                return
            if (data := message.get("bytes")) is not None:
                if (error := self.check(data)) is not None:
                    await self.send_error(error.code, error.message, seq)
                elif self.slot.put(Frame(seq, data, time.monotonic())):
                    self.live.dropped.inc()
                seq += 1
            elif (text := message.get("text")) is not None:
                try:
                    self.options = apply_config(text, self.options, self.mode)
                except FrameError as exc:
                    await self.send_error(exc.code, exc.message)
                    continue
                async with self.send_lock:
                    await self.ws.send_text(json.dumps({"type": "config", **asdict(self.options)}))

    async def process(self) -> None:
        """Answer the newest frame, one at a time, until cancelled; _Closed on inference
        failure."""
        while True:
            frame = await self.slot.take()
            try:
                reply = await run_in_threadpool(self.session.process, frame, self.options)
            except FrameError as exc:
                await self.send_error(exc.code, exc.message, frame.seq)
                continue
            except TritonError as exc:
                raise _inference_failure(exc, frame.seq) from None
            header = {
                "type": "frame",
                "seq": frame.seq,
                "latency_ms": round(1000 * self.live.observe(frame), 1),
                "dropped": self.slot.dropped,
                "face": reply.face,
                "image": reply.image is not None,
            }
            if reply.render_ms is not None:
                header["render_ms"] = reply.render_ms
            async with self.send_lock:
                await self.ws.send_text(json.dumps(header))
                if reply.image is not None:
                    await self.ws.send_bytes(reply.image)

    async def run(self) -> None:
        """Both coroutines until either ends (the other is cancelled); _Closed if one says so."""
        closed: list[_Closed] = []

        async def until_done(part: Callable[[], Awaitable[None]], scope: CancelScope) -> None:
            try:
                await part()
            except _Closed as exc:
                closed.append(exc)
            except WebSocketDisconnect:
                pass  # the client left while a message was being sent
            scope.cancel()

        async with anyio.create_task_group() as tasks:
            tasks.start_soon(until_done, self.receive, tasks.cancel_scope)
            tasks.start_soon(until_done, self.process, tasks.cancel_scope)
        if closed:
            raise closed[0]


async def _close(websocket: WebSocket, code: int, reason: str) -> None:
    """Close unless either side already has; a client that just vanished is not an error."""
    gone = WebSocketState.DISCONNECTED
    if gone in (websocket.application_state, websocket.client_state):
        return
    with contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError):
        await websocket.close(code, reason[:120])  # a close reason is at most 123 bytes


def _pose_version(settings: Settings, version: str | None) -> PoseEncoderInfo:
    """The contract's version and sizes; StreamRefused 4412 if the client's differs."""
    try:
        info = checkpoint_info(settings.base_checkpoint)
    except PoseEncoderUnavailable as exc:
        logger.error("stream: %s", exc)
        raise StreamRefused(CLOSE_INTERNAL_ERROR, "the pose encoder is unavailable") from None
    if version is not None and version != info.version:
        raise StreamRefused(
            CLOSE_VERSION_MISMATCH,
            f"pose encoder version {version[:20]!r} is not the server's {info.version}: "
            "download GET /v1/models/pose-encoder again",
        )
    return info


@router.websocket("/{avatar_id}/stream", name="avatar_stream")
async def stream_avatar(
    websocket: WebSocket,
    avatar_id: str,
    backend: InferenceDep,
    token: str | None = None,
    mode: str = "frames",
    version: str | None = None,
) -> None:
    """Reenact the avatar driven by the client's webcam frames, or by pose descriptors the
    client computed (`mode=pose`); protocol: module docstring."""
    app: Any = websocket.app
    settings: Settings = app.state.settings
    live: LiveStreams = app.state.live
    authorization = websocket.headers.get("authorization") or (token and f"Bearer {token}")
    pose: PoseEncoderInfo | None = None
    try:
        tenant_id, condition = await run_in_threadpool(
            _admit, websocket, authorization, avatar_id, settings
        )
        if mode not in ("frames", "pose"):
            raise StreamRefused(CLOSE_BAD_REQUEST, "mode must be frames or pose")
        if mode == "pose":
            pose = await run_in_threadpool(_pose_version, settings, version)
    except StreamRefused as exc:
        if exc.code == CLOSE_UNAUTHORIZED:  # unauthenticated sockets are never accepted
            await websocket.close(exc.code, exc.reason)
            return
        await websocket.accept()
        await _close(websocket, exc.code, exc.reason)
        return
    if not live.open(tenant_id):
        await websocket.accept()
        limit = settings.max_streams_per_tenant
        await _close(websocket, CLOSE_TOO_MANY_STREAMS, f"at most {limit} streams per tenant")
        return
    try:
        await websocket.accept()
        await _serve(websocket, settings, live, backend, condition, pose)
    finally:
        live.close(tenant_id)


async def _session(
    settings: Settings, backend: LiveBackend, condition: Condition, pose: PoseEncoderInfo | None
) -> LiveSession | PoseSession:
    """The connection's renderer; _Closed when Triton is down or serves another model."""
    try:
        size = await run_in_threadpool(backend.image_size)
    except TritonError as exc:
        raise _inference_failure(exc) from None
    if pose is not None:
        if size != pose.image_size:  # Triton's repository is of another checkpoint
            logger.error(
                "stream: Triton serves %d px, the base checkpoint is %d px: the pose encoder "
                "clients download does not match the generator",
                size,
                pose.image_size,
            )
            raise _Closed(CLOSE_INTERNAL_ERROR, "internal error")
        return PoseSession(
            backend, condition, pose.pose_dim, jpeg_quality=settings.stream_jpeg_quality
        )
    return LiveSession(
        backend,
        await run_in_threadpool(shared_detector),
        condition,
        size,
        jpeg_quality=settings.stream_jpeg_quality,
        max_pixels=settings.max_stream_frame_pixels,
    )


async def _serve(
    websocket: WebSocket,
    settings: Settings,
    live: LiveStreams,
    backend: LiveBackend,
    condition: Condition,
    pose: PoseEncoderInfo | None = None,
) -> None:
    try:
        session = await _session(settings, backend, condition, pose)
        await _Stream(websocket, settings, live, session).run()
    except _Closed as closed:
        if closed.error is not None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await websocket.send_text(json.dumps(closed.error))
        await _close(websocket, closed.code, closed.reason)
    except Exception:
        logger.exception("stream failed")
        await _close(websocket, CLOSE_INTERNAL_ERROR, "internal error")
    else:
        await _close(websocket, 1000, "")
