"""Pose-only telepresence, server side, with TestClient: the pose encoder contract and its
ONNX downloads (a real export of the demo checkpoint, compared with torch), and
`WS /v1/avatars/{id}/stream?mode=pose` over a fake generator (the protocol, typed errors for
malformed descriptors, the version check, latest-frame-wins). The same against a real
tritonserver: tests/integration/test_pose_stream_triton.py."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker
from starlette.websockets import WebSocketDisconnect

from cli.live import ContractCropper
from cli.main import build_parser
from media.crop import crop_face
from media.faces import FaceConfig, FaceDetector
from media.smoothing import BoxSmoother, SmoothingConfig
from model.inference import InferenceModel
from service.api.deps import get_inference
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.live import MAX_POSE_VALUE, FrameError, decode_pose
from service.main import create_app
from service.models import Avatar, AvatarStatus
from service.pose_encoder import PoseEncoderFiles, checkpoint_info
from service.triton import Rendered
from tests.media_samples import panning_frames

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "checkpoints" / "demo-tiny-64.safetensors"
SIZE, DIM = 64, 256  # the demo checkpoint's crop size and pose descriptor length
IDENTITY = np.linspace(-1, 1, 16, dtype=np.float32)
VERSION = hashlib.sha256(DEMO.read_bytes()).hexdigest()[:16]
# ONNX vs torch, max abs difference over descriptors whose values reach about 4: fp32 differs
# by float rounding only; fp16 computes in half (measured ~0.02).
FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2


class PoseBackend:
    """Stands in for Triton's generator: 'renders' a flat colour read from the first three
    pose values (so a reply shows which descriptor it rendered), after `delay_s`."""

    def __init__(self, delay_s: float = 0.0, size: int = SIZE) -> None:
        self.delay_s = delay_s
        self.size = size
        self.calls: list[tuple[np.ndarray, np.ndarray | None, str | None]] = []

    def image_size(self) -> int:
        return self.size

    def reenact(
        self, frames: np.ndarray, identity: np.ndarray | None = None, avatar_id: str | None = None
    ) -> Rendered:
        raise AssertionError("pose mode must not run the pose encoder on the server")

    def render(
        self, poses: np.ndarray, identity: np.ndarray | None = None, avatar_id: str | None = None
    ) -> Rendered:
        self.calls.append((poses.copy(), identity, avatar_id))
        time.sleep(self.delay_s)
        n, s = len(poses), self.size
        colour = colour_of(poses)  # (N, 3)
        rgb = np.broadcast_to(colour[:, :, None, None], (n, 3, s, s)).astype(np.float32)
        return Rendered(np.ascontiguousarray(rgb), np.ones((n, 1, s, s), np.float32))


def colour_of(poses: np.ndarray) -> np.ndarray:
    return np.clip(0.5 + poses[:, :3] / 8, 0, 1)


def pose_bytes(values: np.ndarray) -> bytes:
    return np.asarray(values, dtype="<f2").tobytes()


def a_pose(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1.5, DIM).astype(np.float32)


def decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
        return np.asarray(image.convert("RGB"))


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def pose_url(avatar_id: str, version: str | None = VERSION, mode: str = "pose") -> str:
    query = f"?mode={mode}" + (f"&version={version}" if version is not None else "")
    return f"/v1/avatars/{avatar_id}/stream{query}"


def close_of(ws: Any) -> tuple[int, str]:
    message = ws.receive()
    assert message["type"] == "websocket.close", message
    return int(message["code"]), str(message.get("reason", ""))


# --- fixtures --------------------------------------------------------------------------------


class CountingFiles(PoseEncoderFiles):
    """The real exporter, counting how often it actually runs."""

    exports = 0

    def _export(self, folder: Path) -> None:
        type(self).exports += 1
        super()._export(folder)


@pytest.fixture(scope="module")
def encoder_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The app's pose_encoder_dir: empty until `encoder_dir` (or a download) exports."""
    return tmp_path_factory.mktemp("pose-encoder")


@pytest.fixture(scope="module")
def encoder_dir(encoder_root: Path) -> tuple[Path, list[Path]]:
    """The demo checkpoint's pose encoder, exported by two threads racing for it (as two
    first downloads would): (the directory, the path each thread got)."""
    root = encoder_root
    got: list[Path] = []

    def first_download(precision: Any) -> None:
        got.append(CountingFiles(DEMO, root).path(precision))

    threads = [threading.Thread(target=first_download, args=(p,)) for p in ("fp32", "fp16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return root, got


@pytest.fixture
def settings(db_url: str, tmp_path: Path, encoder_root: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url="127.0.0.1:1",
        base_checkpoint=DEMO,
        pose_encoder_dir=encoder_root,
        stream_idle_timeout_s=5.0,
    )


@pytest.fixture
def backend() -> PoseBackend:
    return PoseBackend()


@pytest.fixture
def app(settings: Settings, backend: PoseBackend) -> FastAPI:
    app = create_app(settings)
    app.dependency_overrides[get_inference] = lambda: backend
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


@pytest.fixture
def key_and_avatar(sessions: sessionmaker[Session]) -> tuple[str, str]:
    with session_scope(sessions) as session:
        tenant = create_tenant(session, "alice")
        key, _ = create_api_key(session, tenant, "test")
        avatar = Avatar(
            tenant_id=tenant.id,
            name="Ada",
            status=AvatarStatus.READY,
            identity_embedding=IDENTITY.astype("<f4").tobytes(),
        )
        session.add(avatar)
        session.flush()
        return key, avatar.id


# --- the contract and the files --------------------------------------------------------------


def test_contract_states_the_served_checkpoint_and_the_crop_rule(
    client: TestClient, key_and_avatar: tuple[str, str]
) -> None:
    key, _ = key_and_avatar
    refused = client.get("/v1/models/pose-encoder")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"
    r = client.get("/v1/models/pose-encoder", headers=bearer(key))
    assert r.status_code == 200, r.text
    c = r.json()
    assert r.headers["X-Model-Version"] == c["version"] == VERSION
    assert (c["name"], c["image_size"], c["pose_dim"]) == ("pose_encoder", SIZE, DIM)
    assert c["input"] == {
        "name": "FRAMES",
        "dtype": "uint8",
        "layout": "NCHW",
        "channels": "RGB",
        "shape": [-1, 3, SIZE, SIZE],
    }
    assert c["output"] == {
        "name": "POSE",
        "dtype": "float32",
        "shape": [-1, DIM],
        "layout": None,
        "channels": None,
    }
    assert "255" in c["normalisation"]
    assert c["wire"] == {"dtype": "float16", "byte_order": "little", "bytes_per_frame": 2 * DIM}
    assert c["files"] == {
        "fp32": "/v1/models/pose-encoder/fp32.onnx",
        "fp16": "/v1/models/pose-encoder/fp16.onnx",
    }
    assert c["stream"] == f"/v1/avatars/{{avatar_id}}/stream?mode=pose&version={VERSION}"
    # The crop rule is read from the code that crops on the server, so it cannot drift.
    face, smooth, crop = FaceConfig(), SmoothingConfig(), c["crop"]
    assert crop["scale"] == face.box_scale == 1.8
    assert (crop["min_confidence"], crop["face"]) == (face.min_confidence, face.policy)
    assert "mediapipe" in crop["detector"] and "full_range" in crop["detector"]
    assert crop["smoothing"]["min_cutoff_hz"] == smooth.min_cutoff
    assert crop["smoothing"]["cut_scale_ratio"] == smooth.cut_scale_ratio
    assert crop["outside_frame"] == {
        "padding": "reflect_101",
        "blur_sigma": 0.016,
        "fade_width": 0.1,
    }


@pytest.mark.slow
def test_the_export_command_reuses_an_existing_export(
    encoder_dir: tuple[Path, list[Path]],
) -> None:
    """`python -m service.pose_encoder` (e.g. at deploy) finds the files and prints them."""
    env = {
        **os.environ,
        "LPD_BASE_CHECKPOINT": str(DEMO),
        "LPD_POSE_ENCODER_DIR": str(encoder_dir[0]),
    }
    done = subprocess.run(
        [sys.executable, "-m", "service.pose_encoder"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(f"{VERSION} fp") for line in lines)
    assert str(encoder_dir[0] / VERSION / "fp16.onnx") in done.stdout


@pytest.mark.slow
def test_concurrent_first_downloads_export_once(encoder_dir: tuple[Path, list[Path]]) -> None:
    root, got = encoder_dir
    assert CountingFiles.exports == 1  # the second thread waited on the lock, then found it
    assert sorted(got) == [root / VERSION / "fp16.onnx", root / VERSION / "fp32.onnx"]
    # Only the finished folder and its lock: no temporary export is left behind.
    assert {p.name for p in root.iterdir()} == {VERSION, f".{VERSION}.lock"}
    assert {p.name for p in (root / VERSION).iterdir()} == {"fp32.onnx", "fp16.onnx"}


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_onnx_download_needs_a_key_and_carries_the_version(
    client: TestClient,
    key_and_avatar: tuple[str, str],
    precision: str,
    encoder_dir: tuple[Path, list[Path]],
) -> None:
    key, _ = key_and_avatar
    path = f"/v1/models/pose-encoder/{precision}.onnx"
    assert client.get(path).status_code == 401
    r = client.get(path, headers=bearer(key))
    assert r.status_code == 200, r.text
    assert r.headers["ETag"] == f'"{VERSION}"' and r.headers["X-Model-Version"] == VERSION
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert "private" in r.headers["Cache-Control"]
    graph = onnx.load_from_string(r.content).graph
    assert [i.name for i in graph.input] == ["FRAMES"] and [o.name for o in graph.output] == [
        "POSE"
    ]
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {t.data_type for t in graph.initializer if len(t.dims) == 4}
    half = onnx.TensorProto.FLOAT16 if precision == "fp16" else onnx.TensorProto.FLOAT
    assert weights == {half}
    # Revalidation: the current version (strong or weak tag) is 304 without a body.
    for tag in (f'"{VERSION}"', f'W/"{VERSION}", "other"', "*"):
        again = client.get(path, headers={**bearer(key), "If-None-Match": tag})
        assert again.status_code == 304 and again.content == b"", tag
        assert again.headers["ETag"] == f'"{VERSION}"'
    stale = client.get(path, headers={**bearer(key), "If-None-Match": '"0123456789abcdef"'})
    assert stale.status_code == 200 and stale.content == r.content


def test_unknown_onnx_file_is_404(client: TestClient, key_and_avatar: tuple[str, str]) -> None:
    r = client.get("/v1/models/pose-encoder/int8.onnx", headers=bearer(key_and_avatar[0]))
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert "fp16.onnx" in r.json()["error"]["message"]


def test_unreadable_checkpoint_is_503_model_unavailable(
    settings: Settings, tmp_path: Path, key_and_avatar: tuple[str, str]
) -> None:
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a checkpoint")
    app = create_app(settings.model_copy(update={"base_checkpoint": broken}))
    with TestClient(app) as client:
        for path in ("/v1/models/pose-encoder", "/v1/models/pose-encoder/fp16.onnx"):
            r = client.get(path, headers=bearer(key_and_avatar[0]))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "model_unavailable"
            assert r.headers["Retry-After"] == str(settings.retry_after_s)


def face_crops() -> np.ndarray:
    """(N, 3, S, S) uint8: real face crops (a moving camera over a photo) and noise."""
    detector = FaceDetector()
    try:
        crops = [
            crop_face(f, detector.crop_box(f), SIZE).image.transpose(2, 0, 1)
            for f in panning_frames(6, size=256)
        ]
    finally:
        detector.close()
    noise = np.random.default_rng(0).integers(0, 256, (2, 3, SIZE, SIZE), dtype=np.uint8)
    return np.ascontiguousarray(np.concatenate([np.stack(crops), noise]))


@pytest.mark.slow
def test_onnx_descriptors_match_torch(
    client: TestClient, key_and_avatar: tuple[str, str], encoder_dir: tuple[Path, list[Path]]
) -> None:
    """What a client computes with the downloaded files is what `InferenceModel` computes,
    within the stated tolerances; fp16 on the wire adds at most a float16 rounding."""
    key, _ = key_and_avatar
    frames = face_crops()
    expected = InferenceModel.from_checkpoint(DEMO).encode_pose(torch.from_numpy(frames)).numpy()
    assert np.abs(expected).max() > 1  # descriptors of real magnitude, not near zero
    for precision, tolerance in (("fp32", FP32_TOLERANCE), ("fp16", FP16_TOLERANCE)):
        model = client.get(f"/v1/models/pose-encoder/{precision}.onnx", headers=bearer(key))
        session = ort.InferenceSession(model.content, providers=["CPUExecutionProvider"])
        (poses,) = session.run(None, {"FRAMES": frames})
        assert poses.dtype == np.float32 and poses.shape == (len(frames), DIM)
        error = float(np.abs(poses - expected).max())
        print(f"\n{precision}: max abs error {error:.2e} (tolerance {tolerance:g})")
        assert error < tolerance, (precision, error)
        wire = np.frombuffer(poses.astype("<f2").tobytes(), "<f2").astype(np.float32)
        rounding = np.abs(wire.reshape(poses.shape) - poses)
        assert (rounding <= np.abs(poses) * 2**-11 + 2**-24).all()  # half of fp16's epsilon


# --- the pose-mode stream --------------------------------------------------------------------


def test_a_descriptor_is_answered_with_a_header_then_its_render(
    client: TestClient, key_and_avatar: tuple[str, str], backend: PoseBackend
) -> None:
    key, avatar_id = key_and_avatar
    pose = a_pose()
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        ws.send_bytes(pose_bytes(pose))
        header = ws.receive_json()
        image = decode(ws.receive_bytes())
    assert header["type"] == "frame" and header["seq"] == 0
    assert (header["face"], header["image"], header["dropped"]) == (True, True, 0)
    assert 0 <= header["render_ms"] <= header["latency_ms"] < 10_000
    assert image.shape == (SIZE, SIZE, 3)
    # The generator got the float16 values as float32 (1, D), with the avatar's identity.
    [(poses, identity, avatar)] = backend.calls
    assert poses.dtype == np.float32 and poses.shape == (1, DIM) and avatar is None
    np.testing.assert_array_equal(poses[0], pose.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(identity, IDENTITY)
    expected = 255 * colour_of(poses)[0]
    assert np.abs(image.reshape(-1, 3).mean(0) - expected).max() < 3  # a flat JPEG


def test_a_stream_without_version_is_trusted(
    client: TestClient, key_and_avatar: tuple[str, str]
) -> None:
    key, avatar_id = key_and_avatar
    with client.websocket_connect(pose_url(avatar_id, version=None), headers=bearer(key)) as ws:
        ws.send_bytes(pose_bytes(a_pose()))
        assert ws.receive_json()["image"] is True
        assert decode(ws.receive_bytes()).shape == (SIZE, SIZE, 3)


def test_another_version_closes_4412(
    client: TestClient, key_and_avatar: tuple[str, str], backend: PoseBackend
) -> None:
    key, avatar_id = key_and_avatar
    with client.websocket_connect(
        pose_url(avatar_id, "0123456789abcdef"), headers=bearer(key)
    ) as ws:
        code, reason = close_of(ws)
    assert code == 4412
    assert VERSION in reason and "/v1/models/pose-encoder" in reason
    assert backend.calls == []


def test_unknown_mode_closes_4400_and_bad_keys_4401(
    client: TestClient, key_and_avatar: tuple[str, str]
) -> None:
    key, avatar_id = key_and_avatar
    with client.websocket_connect(pose_url(avatar_id, mode="audio"), headers=bearer(key)) as ws:
        assert close_of(ws)[0] == 4400
    # Refused before accept, like frames mode: entering the context raises.
    with (
        pytest.raises(WebSocketDisconnect) as refused,
        client.websocket_connect(pose_url(avatar_id), headers=bearer("lpd_nope")),
    ):
        pass
    assert refused.value.code == 4401


def test_a_generator_of_another_size_closes_1011(
    app: FastAPI, key_and_avatar: tuple[str, str]
) -> None:
    """Triton serving a repository of another checkpoint than the API's base checkpoint:
    the downloaded encoder would not match its generator."""
    app.dependency_overrides[get_inference] = lambda: PoseBackend(size=128)
    key, avatar_id = key_and_avatar
    with (
        TestClient(app) as client,
        client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws,
    ):
        assert close_of(ws)[0] == 1011


MALFORMED: list[tuple[str, bytes | str, str, str]] = [
    ("short", b"\x00" * 10, "bad_pose_size", "512 bytes, got 10"),
    ("float32-sized", np.zeros(DIM, "<f4").tobytes(), "bad_pose_size", "float32"),
    ("one byte over", b"\x00" * (2 * DIM + 1), "bad_pose_size", "got 513"),
    ("NaN", pose_bytes(np.r_[np.float32("nan"), np.zeros(DIM - 1)]), "bad_pose_values", "NaN"),
    ("infinity", pose_bytes(np.r_[np.zeros(DIM - 1), -np.inf]), "bad_pose_values", "infinity"),
    ("huge", pose_bytes(np.full(DIM, 2 * MAX_POSE_VALUE)), "bad_pose_values", "within"),
    ("garbage text", "hello", "bad_message", "config"),
    ("paste back", json.dumps({"type": "config", "paste_back": True}), "bad_message", "paste"),
]


@pytest.mark.parametrize(
    ("payload", "code", "says"), [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED]
)
def test_a_malformed_message_gets_a_typed_error_and_the_stream_goes_on(
    client: TestClient,
    key_and_avatar: tuple[str, str],
    backend: PoseBackend,
    payload: bytes | str,
    code: str,
    says: str,
) -> None:
    key, avatar_id = key_and_avatar
    good = a_pose(1)
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        if isinstance(payload, bytes):
            ws.send_bytes(payload)
        else:
            ws.send_text(payload)
        error = ws.receive_json()
        ws.send_bytes(pose_bytes(good))
        header = ws.receive_json()
        image = decode(ws.receive_bytes())
    assert error["type"] == "error" and error["code"] == code, error
    assert says in error["message"], error
    binary = isinstance(payload, bytes)
    assert error.get("seq") == (0 if binary else None)  # binary messages count, text doesn't
    assert header["seq"] == (1 if binary else 0) and header["image"] is True
    assert image.shape == (SIZE, SIZE, 3)
    [(poses, _, _)] = backend.calls  # the bad message never reached the generator
    np.testing.assert_array_equal(poses[0], good.astype(np.float16).astype(np.float32))


def test_an_idle_pose_stream_is_closed_4408(
    settings: Settings, backend: PoseBackend, key_and_avatar: tuple[str, str]
) -> None:
    app = create_app(settings.model_copy(update={"stream_idle_timeout_s": 0.3}))
    app.dependency_overrides[get_inference] = lambda: backend
    key, avatar_id = key_and_avatar
    with (
        TestClient(app) as client,
        client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws,
    ):
        ws.send_bytes(pose_bytes(a_pose()))
        assert ws.receive_json()["seq"] == 0
        ws.receive_bytes()
        assert close_of(ws)[0] == 4408  # nothing more was sent


def test_config_without_paste_back_is_acknowledged(
    client: TestClient, key_and_avatar: tuple[str, str]
) -> None:
    key, avatar_id = key_and_avatar
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        ws.send_text(json.dumps({"type": "config", "paste_back": False, "format": "jpeg"}))
        assert ws.receive_json() == {"type": "config", "paste_back": False, "format": "jpeg"}


def test_latest_descriptor_wins_when_the_generator_is_slow(
    client: TestClient, key_and_avatar: tuple[str, str], backend: PoseBackend
) -> None:
    backend.delay_s = 0.3
    key, avatar_id = key_and_avatar
    sent = 10
    headers: list[dict[str, Any]] = []
    with client.websocket_connect(pose_url(avatar_id), headers=bearer(key)) as ws:
        for i in range(sent):
            ws.send_bytes(pose_bytes(a_pose(i)))
        while not headers or headers[-1]["seq"] != sent - 1:
            headers.append(ws.receive_json())
            ws.receive_bytes()
    dropped = headers[-1]["dropped"]
    assert dropped > 0 and len(headers) + dropped == sent
    assert [h["seq"] for h in headers] == sorted(h["seq"] for h in headers)
    # The last descriptor rendered is the last one sent.
    np.testing.assert_array_equal(
        backend.calls[-1][0][0], a_pose(sent - 1).astype(np.float16).astype(np.float32)
    )


# --- the CLI's crop ---------------------------------------------------------------------------


def test_the_cli_crops_by_the_contract_exactly_as_the_server_does(
    client: TestClient, key_and_avatar: tuple[str, str]
) -> None:
    """`reenact stream --pose-only` configures its cropper from the contract alone; that
    gives the server's own detector and smoother settings, so the same crops."""
    contract = client.get("/v1/models/pose-encoder", headers=bearer(key_and_avatar[0])).json()
    cropper = ContractCropper(contract)
    detector, smoother = FaceDetector(), BoxSmoother()  # what LiveSession uses
    try:
        assert cropper.detector.config == FaceConfig()
        assert cropper.smoother.config == SmoothingConfig()
        for i, frame in enumerate(panning_frames(5, size=256)):
            t = 0.1 * i
            box = smoother.update(detector.crop_box(frame), t)
            assert box is not None
            expected = crop_face(frame, box, SIZE).image
            np.testing.assert_array_equal(cropper(frame, t), expected)
        assert cropper(np.full((256, 256, 3), 128, np.uint8), 1.0) is not None  # box held
    finally:
        cropper.close()
        detector.close()


def test_stream_parses_pose_only_options() -> None:
    args = build_parser().parse_args(
        ["stream", "--avatar", "a1", "--pose-only", "--source", "0", "-o", "out"]
    )
    assert (args.pose_only, args.precision, args.model_cache) == (True, "fp16", None)
    assert args.out == Path("out") and args.source == "0"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["stream", "--avatar", "a1", "--precision", "int8"])


# --- decoding --------------------------------------------------------------------------------


def test_decode_pose_reads_little_endian_float16() -> None:
    values = np.array([1.0, -2.5, 0.5, 0.0] * (DIM // 4), np.float32)
    decoded = decode_pose(values.astype("<f2").tobytes(), DIM)
    assert decoded.dtype == np.float32 and decoded.shape == (1, DIM)
    np.testing.assert_array_equal(decoded[0], values)
    # Big-endian bytes of 1.0 (0x3C00) read as little-endian are 0x003C: a subnormal, not 1.
    big = decode_pose(values.astype(">f2").tobytes(), DIM)
    assert big[0, 0] != 1.0
    with pytest.raises(FrameError) as err:
        decode_pose(b"", DIM)
    assert err.value.code == "bad_pose_size"


def test_checkpoint_info_hashes_the_file_and_reads_its_header(tmp_path: Path) -> None:
    info = checkpoint_info(DEMO)
    assert (info.version, info.image_size, info.pose_dim) == (VERSION, SIZE, DIM)
    data = bytearray(DEMO.read_bytes())
    data[-1] ^= 1  # one weight's last bit: another checkpoint, another version
    changed = tmp_path / "changed.safetensors"
    changed.write_bytes(bytes(data))
    assert checkpoint_info(changed).version not in ("", VERSION)
    assert checkpoint_info(changed).pose_dim == DIM


def test_the_api_reads_the_contract_without_loading_torch() -> None:
    code = (
        "import sys\n"
        "from service.pose_encoder import checkpoint_info\n"
        f"print(checkpoint_info(__import__('pathlib').Path({str(DEMO)!r})).version)\n"
        "assert 'torch' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == VERSION
