"""`WS /v1/avatars/{id}/stream` on a real tritonserver (demo checkpoint, 64 px): a moving face
streamed in, reenacted crops and pasted-back frames out, over TestClient and over uvicorn
with the benchmark client."""

from __future__ import annotations

import asyncio
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.ws_client import measure_stream
from cli.live import run_stream
from media.crop import crop_face
from media.faces import FaceDetector
from media.video import probe
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.main import create_app
from service.models import Avatar, AvatarStatus
from tests.integration.conftest import Triton
from tests.live_server import serve
from tests.media_samples import astronaut, panning_frames

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE = 64  # the demo checkpoint's crop size


def jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return np.asarray(image.convert("RGB"))


def crop(detector: FaceDetector, image: np.ndarray) -> np.ndarray:
    """The official 64 px face crop as (1, 3, S, S) uint8."""
    c = crop_face(image, detector.crop_box(image), SIZE)
    return np.ascontiguousarray(c.image.transpose(2, 0, 1)[None])


@pytest.fixture(scope="module")
def detector() -> Iterator[FaceDetector]:
    d = FaceDetector()
    yield d
    d.close()


@pytest.fixture
def app(db_url: str, tmp_path: Path, triton: Triton) -> FastAPI:
    settings = Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url=triton.server.grpc_url,
        triton_timeout_s=30.0,
    )
    return create_app(settings)


@pytest.fixture
def stream(
    sessions: sessionmaker[Session], triton: Triton, detector: FaceDetector
) -> tuple[str, str, np.ndarray]:
    """(API key, avatar id, identity): a zero-shot avatar of the astronaut, embedded by Triton."""
    identity = triton.backend.embed_identity(crop(detector, astronaut()))
    with session_scope(sessions) as session:
        tenant = create_tenant(session, "acme")
        key, _ = create_api_key(session, tenant, "test")
        avatar = Avatar(
            tenant_id=tenant.id,
            name="astronaut",
            status=AvatarStatus.READY,
            identity_embedding=identity.astype("<f4").tobytes(),
        )
        session.add(avatar)
        session.flush()
        return key, avatar.id, identity


def test_a_moving_face_is_reenacted_frame_by_frame(
    app: FastAPI,
    stream: tuple[str, str, np.ndarray],
    triton: Triton,
    detector: FaceDetector,
) -> None:
    key, avatar_id, identity = stream
    frames = panning_frames(10, size=256)
    headers, images = [], []
    with (
        TestClient(app) as client,
        client.websocket_connect(
            f"/v1/avatars/{avatar_id}/stream", headers={"Authorization": f"Bearer {key}"}
        ) as ws,
    ):
        for frame in frames:  # one at a time: nothing is dropped, every latency is one frame's
            ws.send_bytes(jpeg(frame))
            headers.append(ws.receive_json())
            images.append(decode(ws.receive_bytes()))
        ws.send_text(json.dumps({"type": "config", "paste_back": True}))
        assert ws.receive_json()["paste_back"] is True
        ws.send_bytes(jpeg(frames[-1]))
        pasted_header = ws.receive_json()
        pasted = decode(ws.receive_bytes())

    assert [h["seq"] for h in headers] == list(range(10))
    assert all(h["face"] and h["image"] and h["dropped"] == 0 for h in headers)
    latencies = [h["latency_ms"] for h in headers]
    assert all(0 < ms < 5_000 for ms in latencies), latencies
    print(f"\nper-frame server latency (ms): {latencies}; median {np.median(latencies):.1f}")
    assert all(im.shape == (SIZE, SIZE, 3) for im in images)
    # The first frame's box is its detection (the smoother starts there): the reply is what
    # Triton renders for that crop and this avatar's identity, up to JPEG.
    sent = decode(jpeg(frames[0]))  # what the server decoded
    rgb, _ = triton.backend.reenact(crop(detector, sent), identity=identity).to_uint8()
    error = np.abs(images[0].astype(np.float32) - rgb[0].astype(np.float32)).mean()
    assert error < 6, error
    assert pasted_header["seq"] == 10 and pasted.shape == frames[-1].shape


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    """The app under uvicorn on a free port: ws://host:port."""
    with serve(app) as url:
        yield url.replace("http://", "ws://")


def test_the_benchmark_client_times_a_stream_over_uvicorn(
    server: str, stream: tuple[str, str, np.ndarray]
) -> None:
    key, avatar_id, _ = stream
    url = f"{server}/v1/avatars/{avatar_id}/stream"
    frames = [jpeg(f) for f in panning_frames(10, size=256)]
    paced = asyncio.run(measure_stream(url, key, frames, fps=10))
    flood = asyncio.run(measure_stream(url, key, frames, fps=None))
    print(f"\n10 fps: {json.dumps(paced)}\nflood: {json.dumps(flood)}")
    for report in (paced, flood):
        assert report["close_code"] is None and report["errors"] == {}
        assert report["replies"] + report["dropped"] == 10
        assert report["images"] == report["replies"]
        assert 0 < report["rtt_ms"]["p50"] <= report["rtt_ms"]["p99"] < 5_000


def test_the_cli_streams_a_video_file(
    server: str, stream: tuple[str, str, np.ndarray], tmp_path: Path
) -> None:
    key, avatar_id, _ = stream
    out = tmp_path / "live.mp4"
    driver = ROOT / "samples" / "driver.mp4"
    url = server.replace("ws://", "http://")
    summary = run_stream(url, key, avatar_id, str(driver), out, fps=50, max_frames=12)
    sent, rendered = (int(x) for x in re.findall(r"(\d+) (?:frames|rendered)", summary))
    assert sent == 12 and rendered >= 10, summary  # frames before the first face: no image
    info = probe(out)
    assert (info.num_frames, info.width) == (rendered, 64)
