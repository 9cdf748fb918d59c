"""Pose-only telepresence on a real tritonserver (demo checkpoint, 64 px): descriptors from
the downloaded ONNX encoder against Triton's (torch) pose encoder, `mode=pose` streams
rendered by Triton's generator, malformed messages, the version check, latest-frame-wins,
and `reenact stream --pose-only` on a PyAV-encoded video over uvicorn."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.pose_stream import main as pose_benchmark
from cli.live import run_pose_stream
from cli.main import main as cli_main
from media.crop import crop_face
from media.faces import FaceDetector
from media.video import probe
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.main import create_app
from service.models import Avatar, AvatarStatus
from service.pose_encoder import checkpoint_info
from tests.integration.conftest import DEMO, Triton
from tests.live_server import serve
from tests.media_samples import astronaut, encode_clip, panning_frames

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SIZE, DIM = 64, 256  # the demo checkpoint's
VERSION = checkpoint_info(DEMO).version
# Client ONNX vs Triton's torch pose encoder, max abs difference (descriptors reach ~4).
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
JPEG_TOLERANCE = 6.0  # mean abs difference in 0-255 levels of a q85 64 px JPEG


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return np.asarray(image.convert("RGB"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def wire(pose: np.ndarray) -> bytes:
    return np.asarray(pose, dtype="<f2").tobytes()


def from_wire(data: bytes) -> np.ndarray:
    """What the server decodes: float32 (1, D)."""
    return np.frombuffer(data, "<f2").astype(np.float32)[None]


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """(N, 3, S, S) uint8 face crops of a camera panning over a real photo."""
    detector = FaceDetector()
    try:
        images = [
            crop_face(f, detector.crop_box(f), SIZE).image.transpose(2, 0, 1)
            for f in panning_frames(8, size=256)
        ]
    finally:
        detector.close()
    return np.ascontiguousarray(np.stack(images))


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pose-encoder")  # exported once, by the first download


@pytest.fixture
def app(db_url: str, tmp_path: Path, triton: Triton, encoder_dir: Path) -> FastAPI:
    settings = Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url=triton.server.grpc_url,
        triton_timeout_s=30.0,
        base_checkpoint=DEMO,  # what the triton fixture's repository was built from
        pose_encoder_dir=encoder_dir,
    )
    return create_app(settings)


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def stream(sessions: sessionmaker[Session], triton: Triton) -> tuple[str, str, np.ndarray]:
    """(API key, avatar id, identity): a zero-shot avatar of the astronaut, embedded by Triton."""
    detector = FaceDetector()
    try:
        photo = astronaut()
        crop = crop_face(photo, detector.crop_box(photo), SIZE).image.transpose(2, 0, 1)
    finally:
        detector.close()
    identity = triton.backend.embed_identity(np.ascontiguousarray(crop[None]))
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


def onnx_poses(client: TestClient, key: str, precision: str, crops: np.ndarray) -> np.ndarray:
    """Descriptors as a client computes them: the downloaded file, run by onnxruntime."""
    contract = client.get("/v1/models/pose-encoder", headers=bearer(key)).json()
    r = client.get(contract["files"][precision], headers=bearer(key))
    assert r.status_code == 200 and r.headers["X-Model-Version"] == VERSION
    session = ort.InferenceSession(r.content, providers=["CPUExecutionProvider"])
    (poses,) = session.run(None, {contract["input"]["name"]: crops})
    return np.asarray(poses)


def pose_url(avatar_id: str, version: str = VERSION) -> str:
    return f"/v1/avatars/{avatar_id}/stream?mode=pose&version={version}"


# --- descriptors -----------------------------------------------------------------------------


def test_client_descriptors_match_the_servers(
    client: TestClient, stream: tuple[str, str, np.ndarray], triton: Triton, crops: np.ndarray
) -> None:
    key, _, _ = stream
    served = triton.backend.encode_pose(crops)  # Triton's pose_encoder: our torch code
    assert served.shape == (len(crops), DIM) and np.abs(served).max() > 1
    for precision, tolerance in (("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        error = float(np.abs(onnx_poses(client, key, precision, crops) - served).max())
        print(f"\nclient {precision} vs Triton: max abs error {error:.2e} (< {tolerance:g})")
        assert error < tolerance, (precision, error)


# --- the stream ------------------------------------------------------------------------------


def test_a_pose_stream_renders_what_the_generator_renders(
    client: TestClient, stream: tuple[str, str, np.ndarray], triton: Triton, crops: np.ndarray
) -> None:
    key, avatar_id, identity = stream
    poses = onnx_poses(client, key, "fp16", crops)
    headers, images = [], []
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        for pose in poses:  # one at a time: nothing is dropped
            ws.send_bytes(wire(pose))
            headers.append(ws.receive_json())
            images.append(decode(ws.receive_bytes()))
    assert [h["seq"] for h in headers] == list(range(len(poses)))
    assert all(h["image"] and h["face"] and h["dropped"] == 0 for h in headers)
    assert all(0 < h["render_ms"] <= h["latency_ms"] < 5_000 for h in headers), headers
    print(f"\nrender_ms: {[h['render_ms'] for h in headers]}")
    for pose, image in zip(poses, images, strict=True):
        assert image.shape == (SIZE, SIZE, 3)
        expected, _ = triton.backend.render(from_wire(wire(pose)), identity=identity).to_uint8()
        error = np.abs(image.astype(np.float32) - expected[0].astype(np.float32)).mean()
        assert error < JPEG_TOLERANCE, error
    # Different poses, different renders: the stream is driven by the descriptors.
    assert np.abs(images[0].astype(np.float32) - images[-1].astype(np.float32)).mean() > 1


MALFORMED: list[tuple[bytes | str, str]] = [
    (b"\x00" * 100, "bad_pose_size"),
    (np.zeros(DIM, "<f4").tobytes(), "bad_pose_size"),
    (wire(np.r_[np.zeros(DIM - 1), np.nan]), "bad_pose_values"),
    (wire(np.r_[np.inf, np.zeros(DIM - 1)]), "bad_pose_values"),
    ("}{ not json", "bad_message"),
]


def test_malformed_messages_get_typed_errors_and_the_next_descriptor_renders(
    client: TestClient, stream: tuple[str, str, np.ndarray], crops: np.ndarray
) -> None:
    key, avatar_id, _ = stream
    pose = wire(onnx_poses(client, key, "fp32", crops[:1])[0])
    errors, replies = [], []
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        for payload, _ in MALFORMED:
            if isinstance(payload, bytes):
                ws.send_bytes(payload)
            else:
                ws.send_text(payload)
            errors.append(ws.receive_json())
            ws.send_bytes(pose)
            replies.append(ws.receive_json())
            assert decode(ws.receive_bytes()).shape == (SIZE, SIZE, 3)
    assert [e["code"] for e in errors] == [code for _, code in MALFORMED]
    assert "float32" in errors[1]["message"]
    # seq counts binary messages, unusable ones included; text messages have none.
    assert [e.get("seq") for e in errors] == [0, 2, 4, 6, None]
    assert [r["seq"] for r in replies] == [1, 3, 5, 7, 8]
    assert all(r["type"] == "frame" and r["image"] for r in replies)


def test_a_stale_version_closes_4412(
    client: TestClient, stream: tuple[str, str, np.ndarray]
) -> None:
    key, avatar_id, _ = stream
    with client.websocket_connect(
        pose_url(avatar_id, "ffffffffffffffff"), headers=bearer(key)
    ) as ws:
        message = ws.receive()
    assert message["type"] == "websocket.close" and message["code"] == 4412
    assert "/v1/models/pose-encoder" in message["reason"]


def test_a_burst_of_descriptors_drops_all_but_the_latest(
    client: TestClient, stream: tuple[str, str, np.ndarray], crops: np.ndarray
) -> None:
    key, avatar_id, _ = stream
    poses = [wire(p) for p in onnx_poses(client, key, "fp16", crops)] * 4  # 32 messages
    headers: list[dict[str, Any]] = []
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        for p in poses:
            ws.send_bytes(p)
        while not headers or headers[-1]["seq"] != len(poses) - 1:
            headers.append(ws.receive_json())
            ws.receive_bytes()
    dropped = headers[-1]["dropped"]
    print(f"\nburst of {len(poses)}: {len(headers)} rendered, {dropped} dropped")
    assert dropped > 0 and len(headers) + dropped == len(poses)


# --- the CLI ---------------------------------------------------------------------------------


@pytest.fixture
def server(app: FastAPI) -> Iterator[str]:
    with serve(app) as url:
        yield url


def test_the_cli_streams_a_video_pose_only(
    server: str,
    stream: tuple[str, str, np.ndarray],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, avatar_id, _ = stream
    video = encode_clip(tmp_path / "driver.mp4", panning_frames(12, size=256), fps=25)
    out = tmp_path / "avatar.mp4"
    report = run_pose_stream(
        server, key, avatar_id, str(video), out, fps=50, max_frames=10, cache=tmp_path / "cache"
    )
    print(f"\n{report}")
    assert (report.frames, report.sent, report.rendered) == (10, 10, 10)  # a face in each
    assert report.bytes_per_frame == 2 * DIM == 512
    assert report.version == VERSION and report.precision == "fp16"
    assert (tmp_path / "cache" / VERSION / "fp16.onnx").is_file()
    assert all(ms > 0 for ms in report.render_ms) and len(report.encoder_ms) == 10
    info = probe(out)
    assert (info.num_frames, info.width, info.height) == (10, SIZE, SIZE)

    # The command line, fp32, frames saved as JPEGs into a folder.
    frames_dir = tmp_path / "frames"
    code = cli_main(
        [
            "--url", server, "--key", key, "stream", "--avatar", avatar_id, "--pose-only",
            "--source", str(video), "--frames", "4", "--fps", "50", "--precision", "fp32",
            "--model-cache", str(tmp_path / "cache"), "-o", str(frames_dir),
        ]
    )  # fmt: skip
    assert code == 0
    assert "4 sent (512 B each), 4 rendered" in capsys.readouterr().err
    saved = sorted(frames_dir.glob("*.jpg"))
    assert len(saved) == 4 and all(decode(p.read_bytes()).shape == (SIZE, SIZE, 3) for p in saved)


def test_the_benchmark_measures_both_modes_side_by_side(
    server: str, stream: tuple[str, str, np.ndarray], tmp_path: Path
) -> None:
    key, avatar_id, _ = stream
    out = tmp_path / "pose_stream.json"
    argv = ["--url", server, "--key", key, "--avatar", avatar_id, "--frames", "6"]
    assert pose_benchmark([*argv, "--fps", "50", "--no-official-encoder", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    sizes = report["bytes_per_frame"]
    assert sizes["pose_fp16"] == {"payload_mean": 512.0, "ws_frame_mean": 520.0}
    assert sizes["jpeg_640x480"]["payload_mean"] > 20 * 512
    assert report["jpeg_640x480_over_pose"] > 20
    lockstep = report["loopback_lockstep"]
    for mode in ("frames_mode", "pose_mode"):
        assert (lockstep[mode]["frames"], lockstep[mode]["images"]) == (6, 6)
        assert 0 < lockstep[mode]["rtt_ms"]["p50"] < 5_000
    assert 0 < lockstep["pose_mode"]["server_render_ms"]["p50"] < 5_000
    assert "server_render_ms" not in lockstep["frames_mode"]  # frames mode is unchanged
    encoders = report["client_cpu_ms"]["pose_encoder"]
    assert set(encoders) == {
        f"{p}_{t}" for p in ("fp32", "fp16") for t in ("1_thread", "default_threads")
    }
    assert all(e["p50"] > 0 for e in encoders.values())
    # The same frames through either mode give renders of the same pose. They are not equal:
    # the server crops the JPEG it received, the client the raw frame, and the descriptor is
    # fp16. A model that follows pose shows those differences: mean 1.6 levels with the
    # stage-1 demo (which ignored pose), 8.8 with the stage-2 demo.
    assert report["frames_vs_pose_render_mean_abs_diff"] < 16
