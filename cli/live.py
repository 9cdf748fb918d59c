"""`reenact stream`: frames from a webcam or a video file through `WS /v1/avatars/{id}/stream`,
one at a time (each sent after the previous answer, at most `fps` a second), the answers
optionally saved as a video (or, for a path without a video suffix, as numbered JPEGs).

`--pose-only` keeps the frames here: each is cropped as the server's contract says (mediapipe,
the same code the server runs), encoded by the downloaded ONNX pose encoder (onnxruntime) and
sent as 2 x D bytes of float16 (`?mode=pose`); only the avatar comes back.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from cli.api import ApiError, Client
from media.crop import crop_face
from media.errors import MediaError
from media.faces import FaceConfig, FaceDetector
from media.smoothing import BoxSmoother, SmoothingConfig
from media.video import VideoWriter, read_frames

Precision = Literal["fp32", "fp16"]
VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".mov", ".avi"})
JPEG_QUALITY = 85  # of the frames `run_stream` sends


def _frames(source: str) -> Iterator[np.ndarray]:
    """RGB frames from a video file, or from a camera ("webcam" or an index) via OpenCV."""
    if Path(source).is_file():
        for frame in read_frames(source):
            yield frame.image
        return
    import cv2

    camera = cv2.VideoCapture(0 if source == "webcam" else int(source))
    if not camera.isOpened():
        raise ApiError(0, "no_camera", f"cannot open camera {source!r}")
    try:
        while True:
            ok, bgr = camera.read()
            if not ok:
                return
            yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    finally:
        camera.release()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def _ws_url(url: str, avatar_id: str, query: str = "") -> str:
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    return f"{ws_url}/v1/avatars/{avatar_id}/stream{query}"


class _Sink:
    """Where received frames go: a video (by suffix), a folder of numbered JPEGs, or nowhere."""

    def __init__(self, out: Path | None, fps: float) -> None:
        self.out = out
        self.fps = fps
        self.writer: VideoWriter | None = None
        self.count = 0
        if out is not None and out.suffix.lower() not in VIDEO_SUFFIXES:
            out.mkdir(parents=True, exist_ok=True)

    def write(self, jpeg: bytes) -> np.ndarray:
        """Save one received JPEG; returns it decoded (checks it is one)."""
        image = np.asarray(Image.open(io.BytesIO(jpeg), formats=["JPEG"]).convert("RGB"))
        if self.out is not None:
            if self.out.suffix.lower() in VIDEO_SUFFIXES:
                if self.writer is None:
                    h, w = image.shape[:2]
                    self.writer = VideoWriter(self.out, self.fps, w, h)
                self.writer.write(image)
            else:
                (self.out / f"frame_{self.count:06d}.jpg").write_bytes(jpeg)
        self.count += 1
        return image

    def close(self, ok: bool) -> None:
        if self.writer is None:
            return
        if ok:
            self.writer.close()
        else:
            self.writer.abort()


def _reply(ws: ClientConnection) -> tuple[dict[str, Any], bytes | None]:
    """One frame reply: the header, and the JPEG that follows when `image` is true."""
    header = json.loads(ws.recv())
    if header.get("type") == "error":
        raise ApiError(0, header["code"], header["message"])
    if not header.get("image"):
        return header, None
    reply = ws.recv()
    if not isinstance(reply, bytes):
        raise ApiError(0, "protocol_error", "expected a JPEG after the header")
    return header, reply


def run_stream(
    url: str,
    key: str,
    avatar_id: str,
    source: str,
    out: Path | None,
    fps: float,
    max_frames: int | None,
) -> str:
    """Stream until the source ends (or `max_frames`); returns a one-line summary."""
    latencies: list[float] = []
    sink = _Sink(out, fps)
    sent = 0
    with connect(
        _ws_url(url, avatar_id), additional_headers={"Authorization": f"Bearer {key}"}
    ) as ws:
        try:
            for rgb in _frames(source):
                if max_frames is not None and sent >= max_frames:
                    break
                start = time.perf_counter()
                ws.send(_jpeg(rgb))
                sent += 1
                _, jpeg = _reply(ws)
                if jpeg is not None:
                    sink.write(jpeg)
                    latencies.append(1000 * (time.perf_counter() - start))
                time.sleep(max(0.0, 1 / fps - (time.perf_counter() - start)))
        except BaseException:
            sink.close(ok=False)
            raise
    sink.close(ok=True)
    if not latencies:
        return f"{sent} frames sent, none answered with a face"
    p50, p99 = np.percentile(latencies, [50, 99])
    return (
        f"{sent} frames, {len(latencies)} rendered, round trip p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )


# --- pose-only --------------------------------------------------------------------------------


def fetch_pose_encoder(
    client: Client, precision: Precision, cache: Path
) -> tuple[dict[str, Any], Path]:
    """(the contract, the ONNX file): downloaded once per version into `cache/<version>/`."""
    contract = client.pose_encoder_contract()
    path = cache / contract["version"] / f"{precision}.onnx"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download(contract["files"][precision], path)
    return contract, path


class PoseEncoder:
    """The server's pose encoder, run here with onnxruntime: S x S crop in, (D,) float32 out."""

    def __init__(self, path: Path, contract: dict[str, Any]) -> None:
        import onnxruntime as ort  # only the pose-only client needs it

        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        self.input = contract["input"]["name"]
        self.size = int(contract["image_size"])
        self.dim = int(contract["pose_dim"])

    def __call__(self, crop: np.ndarray) -> np.ndarray:
        frames = np.ascontiguousarray(crop.transpose(2, 0, 1)[None])  # (1, 3, S, S) uint8
        (pose,) = self.session.run(None, {self.input: frames})
        return np.asarray(pose, dtype=np.float32)[0]  # (D,)


class ContractCropper:
    """Frames -> S x S crops by the contract's rule: mediapipe box x scale, One Euro smoothed,
    held through misses (the code the server's frames mode runs, configured from the contract)."""

    def __init__(self, contract: dict[str, Any]) -> None:
        rule = contract["crop"]
        smoothing = rule["smoothing"]
        self.size = int(contract["image_size"])
        self.detector = FaceDetector(
            FaceConfig(
                model_selection=0 if "short_range" in rule["detector"] else 1,
                min_confidence=float(rule["min_confidence"]),
                policy=rule["face"],
                box_scale=float(rule["scale"]),
            )
        )
        self.smoother = BoxSmoother(
            SmoothingConfig(
                min_cutoff=float(smoothing["min_cutoff_hz"]),
                beta=float(smoothing["beta"]),
                d_cutoff=float(smoothing["d_cutoff_hz"]),
                cut_threshold=float(smoothing["cut_threshold"]),
                cut_scale_ratio=float(smoothing["cut_scale_ratio"]),
            )
        )

    def __call__(self, rgb: np.ndarray, t: float) -> np.ndarray | None:
        """The crop of this frame (uint8 (S, S, 3)); None before the first face."""
        try:
            detected = self.detector.crop_box(rgb)
        except MediaError:
            detected = None
        box = self.smoother.update(detected, t)
        if box is None:
            return None
        try:
            return crop_face(rgb, box, self.size).image
        except ValueError:  # the held box lies outside this frame
            return None

    def close(self) -> None:
        self.detector.close()


@dataclass
class PoseStreamReport:
    """What a pose-only stream did, for the summary line and for tests."""

    precision: str
    version: str
    frames: int = 0  # read from the source
    sent: int = 0  # descriptors sent (frames with a face, or after one)
    bytes_per_frame: int = 0
    rendered: int = 0
    encoder_ms: list[float] = field(default_factory=list)
    rtt_ms: list[float] = field(default_factory=list)
    render_ms: list[float] = field(default_factory=list)

    def __str__(self) -> str:
        if not self.rendered:
            return f"{self.frames} frames, {self.sent} sent, none rendered"

        def p(values: list[float], q: float) -> float:
            return float(np.percentile(values, q))

        return (
            f"{self.frames} frames, {self.sent} sent ({self.bytes_per_frame} B each), "
            f"{self.rendered} rendered; pose encoder ({self.precision}) p50 "
            f"{p(self.encoder_ms, 50):.1f} ms; round trip p50 {p(self.rtt_ms, 50):.0f} ms, "
            f"p99 {p(self.rtt_ms, 99):.0f} ms; server render p50 {p(self.render_ms, 50):.1f} ms"
        )


def run_pose_stream(
    url: str,
    key: str,
    avatar_id: str,
    source: str,
    out: Path | None,
    fps: float,
    max_frames: int | None,
    precision: Precision = "fp16",
    cache: Path | None = None,
) -> PoseStreamReport:
    """Stream pose descriptors computed here until the source ends (or `max_frames` frames
    were read); the rendered avatar goes to `out` like `run_stream`'s."""
    with Client(url, key) as client:
        contract, path = fetch_pose_encoder(
            client, precision, cache or Path.home() / ".cache" / "lpd" / "pose-encoder"
        )
    encoder = PoseEncoder(path, contract)
    cropper = ContractCropper(contract)
    report = PoseStreamReport(precision, contract["version"])
    sink = _Sink(out, fps)
    query = f"?mode=pose&version={contract['version']}"
    try:
        with connect(
            _ws_url(url, avatar_id, query), additional_headers={"Authorization": f"Bearer {key}"}
        ) as ws:
            for rgb in _frames(source):
                if max_frames is not None and report.frames >= max_frames:
                    break
                start = time.perf_counter()
                report.frames += 1
                crop = cropper(rgb, time.monotonic())
                if crop is not None:
                    pose = encoder(crop)
                    report.encoder_ms.append(1000 * (time.perf_counter() - start))
                    payload = pose.astype("<f2").tobytes()
                    sent_at = time.perf_counter()
                    ws.send(payload)
                    report.sent += 1
                    report.bytes_per_frame = len(payload)
                    header, jpeg = _reply(ws)
                    if jpeg is not None:
                        sink.write(jpeg)
                        report.rendered += 1
                        report.rtt_ms.append(1000 * (time.perf_counter() - sent_at))
                        report.render_ms.append(float(header.get("render_ms", 0.0)))
                time.sleep(max(0.0, 1 / fps - (time.perf_counter() - start)))
    except BaseException:
        sink.close(ok=False)
        raise
    finally:
        cropper.close()
    sink.close(ok=True)
    return report
