"""`WS /v1/avatars/{id}/stream` with TestClient and an echo backend: the protocol, close codes,
latest-frame-wins dropping, bad messages, the idle timeout; the real Triton adapter for a
server that is down; and benchmarks.ws_client against a real uvicorn server."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker
from starlette.websockets import WebSocketDisconnect
from websockets.exceptions import InvalidStatus

from benchmarks.ws_client import measure_stream
from service.api.deps import get_inference
from service.auth import create_api_key, create_tenant, revoke_api_key
from service.config import Settings
from service.db import session_scope
from service.live import Frame, LatestFrame, StreamOptions, apply_config
from service.main import create_app
from service.models import Avatar, AvatarStatus
from service.triton import BadInput, InferenceUnavailable, ModelNotReady, Rendered, TritonError
from tests.media_samples import astronaut

SIZE = 64
IDENTITY = np.linspace(-1, 1, 16, dtype=np.float32)


class EchoBackend:
    """Stands in for Triton: 'renders' the driving crop itself (mask 1) after `delay_s`, so
    outputs can be compared with inputs; records what it was asked."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple[tuple[int, ...], np.ndarray | None, str | None]] = []
        self.error: TritonError | None = None  # raised by reenact when set

    def image_size(self) -> int:
        return SIZE

    def reenact(
        self, frames: np.ndarray, identity: np.ndarray | None = None, avatar_id: str | None = None
    ) -> Rendered:
        self.calls.append((frames.shape, identity, avatar_id))
        if self.error is not None:
            raise self.error
        time.sleep(self.delay_s)
        rgb = frames.astype(np.float32) / 255.0
        return Rendered(rgb, np.ones((len(frames), 1, SIZE, SIZE), np.float32))


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url="127.0.0.1:1",  # nothing listens: the real adapter finds the server down
        triton_timeout_s=2.0,
        max_stream_frame_bytes=200_000,
        max_stream_frame_pixels=600_000,
        max_streams_per_tenant=2,
        stream_idle_timeout_s=5.0,
    )


@pytest.fixture
def backend() -> EchoBackend:
    return EchoBackend()


@pytest.fixture
def app(settings: Settings, backend: EchoBackend) -> FastAPI:
    app = create_app(settings)
    app.dependency_overrides[get_inference] = lambda: backend
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def new_tenant(sessions: sessionmaker[Session], name: str) -> tuple[str, str]:
    """(tenant id, API key)."""
    with session_scope(sessions) as session:
        tenant = create_tenant(session, name)
        key, _ = create_api_key(session, tenant, "test")
        return tenant.id, key


def add_avatar(
    sessions: sessionmaker[Session], tenant_id: str, status: AvatarStatus = AvatarStatus.READY
) -> str:
    with session_scope(sessions) as session:
        avatar = Avatar(
            tenant_id=tenant_id,
            name="Ada",
            status=status,
            identity_embedding=IDENTITY.astype("<f4").tobytes()
            if status is AvatarStatus.READY
            else None,
        )
        session.add(avatar)
        session.flush()
        return avatar.id


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> tuple[str, str]:
    return new_tenant(sessions, "alice")


@pytest.fixture
def avatar(sessions: sessionmaker[Session], alice: tuple[str, str]) -> str:
    return add_avatar(sessions, alice[0])


def url(avatar_id: str, token: str | None = None) -> str:
    query = f"?token={token}" if token else ""
    return f"/v1/avatars/{avatar_id}/stream{query}"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


FACE = np.asarray(Image.fromarray(astronaut()).resize((256, 256)))
FACE_JPEG = jpeg(FACE)
GREY_JPEG = jpeg(np.full((256, 256, 3), 128, np.uint8))


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return np.asarray(image.convert("RGB"))


def close_code(ws: Any) -> int:
    """The code of the close that ends the stream (the next message must be it)."""
    message = ws.receive()
    assert message["type"] == "websocket.close", message
    return int(message["code"])


# --- the protocol ----------------------------------------------------------------------------


def test_a_frame_is_answered_with_a_header_then_the_reenacted_crop(
    client: TestClient, alice: tuple[str, str], avatar: str, backend: EchoBackend
) -> None:
    with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
        ws.send_bytes(FACE_JPEG)
        header = ws.receive_json()
        image = decode(ws.receive_bytes())
    assert header["type"] == "frame" and header["seq"] == 0
    assert (header["face"], header["image"], header["dropped"]) == (True, True, 0)
    assert 0 < header["latency_ms"] < 10_000
    assert image.shape == (SIZE, SIZE, 3)
    # The avatar's stored embedding drives the render, zero-shot, on one face crop.
    [(shape, identity, avatar_id)] = backend.calls
    assert shape == (1, 3, SIZE, SIZE) and avatar_id is None
    assert identity is not None and identity.dtype == np.float32
    np.testing.assert_array_equal(identity, IDENTITY)
    # The echo render is the crop: a face crop is mostly not the grey of a background.
    assert image.std() > 20


def test_token_parameter_and_paste_back_return_the_whole_frame(
    client: TestClient, alice: tuple[str, str], avatar: str
) -> None:
    with client.websocket_connect(url(avatar, token=alice[1])) as ws:
        ws.send_text(json.dumps({"type": "config", "paste_back": True}))
        assert ws.receive_json() == {"type": "config", "paste_back": True, "format": "jpeg"}
        ws.send_bytes(FACE_JPEG)
        header = ws.receive_json()
        pasted = decode(ws.receive_bytes())
        ws.send_text(json.dumps({"type": "config", "paste_back": False}))
        assert ws.receive_json()["paste_back"] is False
        ws.send_bytes(FACE_JPEG)
        assert ws.receive_json()["seq"] == 1
        assert decode(ws.receive_bytes()).shape == (SIZE, SIZE, 3)
    assert header["image"] and pasted.shape == FACE.shape
    # An echo render pasted back where it was cut out gives the frame back (64 px crop:
    # blurred, JPEG'd twice), nowhere near a misplaced paste.
    error = np.abs(pasted.astype(np.float32) - FACE.astype(np.float32)).mean()
    assert error < 12, error


def test_no_face_yet_sends_no_image_then_the_last_box_is_held(
    client: TestClient, alice: tuple[str, str], avatar: str, backend: EchoBackend
) -> None:
    with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
        ws.send_bytes(GREY_JPEG)
        first = ws.receive_json()
        ws.send_bytes(FACE_JPEG)
        second = ws.receive_json()
        ws.receive_bytes()
        ws.send_bytes(GREY_JPEG)
        third = ws.receive_json()
        held = decode(ws.receive_bytes())
    assert (first["seq"], first["face"], first["image"]) == (0, False, False)
    assert (second["seq"], second["face"], second["image"]) == (1, True, True)
    assert (third["seq"], third["face"], third["image"]) == (2, False, True)
    assert held.shape == (SIZE, SIZE, 3)
    assert len(backend.calls) == 2  # nothing is rendered before a face is seen


def test_latest_frame_wins_when_inference_is_slow(
    client: TestClient, alice: tuple[str, str], avatar: str, backend: EchoBackend
) -> None:
    backend.delay_s = 0.4
    sent = 8
    headers = []
    with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
        for _ in range(sent):
            ws.send_bytes(FACE_JPEG)
        while not headers or headers[-1]["seq"] != sent - 1:
            headers.append(ws.receive_json())
            ws.receive_bytes()
    seqs = [h["seq"] for h in headers]
    dropped = headers[-1]["dropped"]
    assert seqs == sorted(seqs) and seqs[-1] == sent - 1  # the newest frame is answered last
    assert dropped > 0 and len(headers) < sent
    assert len(headers) + dropped == sent  # every frame was either answered or dropped
    assert len(backend.calls) == len(headers)
    metrics = client.get("/metrics").text
    assert f"lpd_stream_frames_dropped_total {float(dropped)}" in metrics
    assert f"lpd_stream_frame_latency_seconds_count {float(len(headers))}" in metrics


def test_bad_messages_get_errors_and_the_stream_goes_on(
    client: TestClient, alice: tuple[str, str], avatar: str
) -> None:
    with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
        ws.send_bytes(b"not a jpeg")
        not_jpeg = ws.receive_json()
        ws.send_bytes(FACE_JPEG[:3000])  # truncated
        truncated = ws.receive_json()
        ws.send_bytes(b"\xff" * 200_001)
        too_big = ws.receive_json()
        ws.send_bytes(jpeg(np.zeros((1000, 1000, 3), np.uint8)))  # small file, 1 Mpx
        too_many_pixels = ws.receive_json()
        ws.send_text("{not json")
        not_json = ws.receive_json()
        ws.send_text(json.dumps({"type": "config", "paste_back": "yes"}))
        bad_value = ws.receive_json()
        ws.send_text(json.dumps({"type": "config", "format": "png"}))
        bad_format = ws.receive_json()
        ws.send_bytes(FACE_JPEG)
        reply = ws.receive_json()
        ws.receive_bytes()
    assert (not_jpeg["type"], not_jpeg["code"], not_jpeg["seq"]) == ("error", "not_a_jpeg", 0)
    assert (truncated["code"], truncated["seq"]) == ("not_a_jpeg", 1)
    assert (too_big["code"], too_big["seq"]) == ("frame_too_large", 2)
    assert (too_many_pixels["code"], too_many_pixels["seq"]) == ("frame_too_large", 3)
    assert "1000x1000" in too_many_pixels["message"]
    assert {not_json["code"], bad_value["code"], bad_format["code"]} == {"bad_message"}
    assert "seq" not in not_json
    assert (reply["type"], reply["seq"], reply["image"]) == ("frame", 4, True)


def test_config_messages_update_only_what_they_name() -> None:
    options = apply_config('{"type": "config", "paste_back": true}', StreamOptions())
    assert options == StreamOptions(paste_back=True)
    assert apply_config('{"type": "config", "format": "jpeg"}', options) == options


def test_latest_frame_keeps_one_frame_and_counts_drops() -> None:
    async def scenario() -> None:
        slot = LatestFrame()
        assert not slot.put(Frame(0, b"a", 0.0))
        assert slot.put(Frame(1, b"b", 0.0)) and slot.put(Frame(2, b"c", 0.0))
        assert (await slot.take()).seq == 2 and slot.dropped == 2
        waiter = asyncio.ensure_future(slot.take())
        await asyncio.sleep(0.01)
        assert not waiter.done()  # empty: take waits for the next frame
        slot.put(Frame(3, b"d", 0.0))
        assert (await waiter).seq == 3 and slot.dropped == 2

    asyncio.run(scenario())


# --- refusals and closing --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["none", "malformed", "unknown", "revoked"])
def test_unauthenticated_streams_are_closed_with_4401(
    client: TestClient,
    sessions: sessionmaker[Session],
    alice: tuple[str, str],
    avatar: str,
    how: str,
) -> None:
    key = alice[1]
    if how == "revoked":
        with session_scope(sessions) as session:
            revoke_api_key(session, key.split("_")[1])
    token = {"none": None, "malformed": "abc", "unknown": key[:-4] + "AAAA", "revoked": key}[how]
    # Refused before accept: entering the context raises.
    with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect(url(avatar, token)):
        pass
    assert info.value.code == 4401


def test_other_tenants_unknown_and_unready_avatars_are_refused(
    client: TestClient, sessions: sessionmaker[Session], alice: tuple[str, str], avatar: str
) -> None:
    _, bob_key = new_tenant(sessions, "bob")
    pending = add_avatar(sessions, alice[0], AvatarStatus.PENDING)
    cases = [(avatar, bob_key, 4404), ("no-such-avatar", alice[1], 4404), (pending, alice[1], 4409)]
    for avatar_id, key, code in cases:
        with client.websocket_connect(url(avatar_id), headers=bearer(key)) as ws:
            assert close_code(ws) == code, avatar_id


def test_a_tenant_may_open_only_max_streams(
    client: TestClient, alice: tuple[str, str], avatar: str
) -> None:
    headers = bearer(alice[1])
    with (
        client.websocket_connect(url(avatar), headers=headers),
        client.websocket_connect(url(avatar), headers=headers),
        client.websocket_connect(url(avatar), headers=headers) as third,
    ):
        assert close_code(third) == 4429
    # Both slots were given back when those streams ended.
    with client.websocket_connect(url(avatar), headers=headers) as ws:
        ws.send_bytes(FACE_JPEG)
        assert ws.receive_json()["seq"] == 0


def test_an_idle_stream_is_closed_with_4408(
    settings: Settings, backend: EchoBackend, alice: tuple[str, str], avatar: str
) -> None:
    app = create_app(settings.model_copy(update={"stream_idle_timeout_s": 0.3}))
    app.dependency_overrides[get_inference] = lambda: backend
    with (
        TestClient(app) as client,
        client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws,
    ):
        assert close_code(ws) == 4408


def test_a_down_inference_server_is_reported_then_closed_with_1013(
    settings: Settings, alice: tuple[str, str], avatar: str
) -> None:
    app = create_app(settings)  # the real Triton adapter, pointed at a closed port
    with (
        TestClient(app) as client,
        client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws,
    ):
        error = ws.receive_json()
        assert close_code(ws) == 1013
    assert (error["type"], error["code"]) == ("error", "inference_unavailable")
    assert "127.0.0.1" not in error["message"]  # internals are logged, not sent


@pytest.mark.parametrize(
    ("error", "code", "close"),
    [
        (InferenceUnavailable("Triton at 10.0.0.7:8001 is down"), "inference_unavailable", 1013),
        (ModelNotReady("model is not ready", model="reenact"), "model_not_ready", 1013),
        (BadInput("identity must be float32 (512,)"), "internal_error", 1011),
    ],
)
def test_inference_failing_mid_stream_is_reported_then_closed(
    client: TestClient,
    alice: tuple[str, str],
    avatar: str,
    backend: EchoBackend,
    error: TritonError,
    code: str,
    close: int,
) -> None:
    backend.error = error
    with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
        ws.send_bytes(FACE_JPEG)
        message = ws.receive_json()
        assert close_code(ws) == close
    assert (message["type"], message["code"], message["seq"]) == ("error", code, 0)
    assert "10.0.0.7" not in message["message"] and "512" not in message["message"]


# --- a real server and the benchmark client --------------------------------------------------


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn (its websockets protocol) on a free port: ws://host:port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"ws://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_measure_stream_over_a_real_server(
    server: str, alice: tuple[str, str], avatar: str, backend: EchoBackend
) -> None:
    backend.delay_s = 0.05
    stream_url = f"{server}{url(avatar)}"
    report = asyncio.run(measure_stream(stream_url, alice[1], [FACE_JPEG] * 6, fps=None))
    assert report["frames"] == 6 and report["close_code"] is None
    assert report["replies"] + report["dropped"] == 6 and report["images"] == report["replies"]
    assert report["errors"] == {}
    assert 0 < report["rtt_ms"]["p50"] <= report["rtt_ms"]["p99"] < 10_000
    # Over a real server, a bad key is a refused handshake (uvicorn: HTTP 403).
    with pytest.raises(InvalidStatus) as info:
        asyncio.run(measure_stream(stream_url, "lpd_000000000000_" + "A" * 43, [FACE_JPEG]))
    assert info.value.response.status_code == 403


def test_opening_a_stream_counts_against_the_rate_limit(
    settings: Settings, backend: EchoBackend, alice: tuple[str, str], avatar: str
) -> None:
    """Like any request: the third stream in a minute at 2/min is refused with 4429. Real
    Redis (DB 9), a key prefix of this test's own."""
    prefix = f"test:stream:{uuid.uuid4().hex}:"
    update = {
        "redis_url": "redis://127.0.0.1:6379/9",
        "rate_limit_key_prefix": prefix,
        "rate_limit_per_minute": 2,
    }
    app = create_app(settings.model_copy(update=update))
    app.dependency_overrides[get_inference] = lambda: backend
    try:
        with TestClient(app) as client:
            for _ in range(2):
                with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
                    ws.send_bytes(FACE_JPEG)
                    assert ws.receive_json()["type"] == "frame"
            with client.websocket_connect(url(avatar), headers=bearer(alice[1])) as ws:
                assert close_code(ws) == 4429
    finally:
        r = redis.Redis.from_url(update["redis_url"])
        keys = list(r.scan_iter(match=f"{prefix}*"))
        if keys:
            r.delete(*keys)
