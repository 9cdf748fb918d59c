"""Pose-only telepresence against frames mode, side by side in one run on one stack:

1. bytes per frame up the wire: the pose descriptor (2 x D float16) against the JPEG frames
   the frames-mode client sends (cli/live.py's quality), at two frame sizes, and the S x S crop;
2. the client's work per frame in pose mode, on CPU: face detection + crop (mediapipe) and the
   ONNX pose encoder (onnxruntime, fp32 and fp16, 1 thread and the default): the served demo
   encoder (64 px), and an official-256 one (random weights: the speed is the same);
3. the server's generator call per frame (`render_ms` of the pose-mode replies);
4. end-to-end latency over loopback, both modes, the same frames, lockstep (each frame sent
   after the previous answer, as `reenact stream` does): round trip, and the server's
   `latency_ms`; and how far the two modes' renders of the same frames differ.

It starts the whole stack (deploy.local: Redis, SQLite, tritonserver with the demo checkpoint,
a Celery worker, uvicorn), makes an avatar from a photo, downloads the contract and encoders
through the API (the first download exports them). `--url/--key` use a running stack.

    python -m benchmarks.pose_stream --out benchmarks/results/pose_stream_cpu.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from websockets.sync.client import ClientConnection, connect

from benchmarks.report import cpu_name, emit
from benchmarks.ws_client import _summary
from cli.api import Client
from cli.live import JPEG_QUALITY, ContractCropper
from deploy.local import LocalStack, LocalStackConfig
from deploy.triton.serve import free_port
from tests.media_samples import astronaut, panning_frames


def _jpeg(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data), formats=["JPEG"]).convert("RGB"))


def _ws_overhead(payload: int) -> int:
    """Bytes a client adds to a binary message of `payload` bytes: header and mask key."""
    return 2 + 4 + (2 if payload > 125 else 0) + (6 if payload > 65535 else 0)


def webcam_frames(n: int) -> list[np.ndarray]:
    """640 x 480 frames of a camera panning over a face photo (upscaled 256 px pans, padded
    to 4:3): a webcam's frame size; a real camera's noise makes its JPEGs larger."""
    out = []
    for frame in panning_frames(n, size=256):
        big = cv2.resize(frame, (480, 480), interpolation=cv2.INTER_CUBIC)
        out.append(cv2.copyMakeBorder(big, 0, 0, 80, 80, cv2.BORDER_REFLECT_101))
    return out


def _time_ms(fn: Callable[[], object], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - start))
    return times


def encoder_times(path: Path, crops: np.ndarray, threads: int | None) -> list[float]:
    """Per-frame onnxruntime CPU time of one S x S crop (batch 1), after a warm-up."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    batches = [np.ascontiguousarray(c[None]) for c in crops]
    for b in batches[:3]:
        session.run(None, {name: b})
    times = []
    for b in batches:
        start = time.perf_counter()
        session.run(None, {name: b})
        times.append(1000 * (time.perf_counter() - start))
    return times


def official_encoder_times(crops: np.ndarray, tmp: Path) -> dict[str, Any]:
    """The encoder a paper-sized (official-256) checkpoint would serve, exported here with
    random weights (same graph, same speed), timed on the crops upscaled to 256 px."""
    import torch

    from deploy.triton.onnx_export import export_pose_encoder
    from model.config import ModelConfig
    from model.inference import InferenceModel
    from model.reenactor import Reenactor

    config = ModelConfig.preset("official-256")
    torch.manual_seed(0)
    files = export_pose_encoder(InferenceModel(Reenactor(config)), tmp / "official-256")
    s = config.image_size
    big = np.stack([cv2.resize(c.transpose(1, 2, 0), (s, s)).transpose(2, 0, 1) for c in crops])
    return {
        "image_size": s,
        "onnx_file_bytes": {p: f.stat().st_size for p, f in files.items()},
        **{
            f"{p}_{'1_thread' if threads else 'default_threads'}": _summary(
                encoder_times(files[p], np.ascontiguousarray(big), threads)
            )
            for p in ("fp32", "fp16")
            for threads in (1, None)
        },
    }


def _reply(ws: ClientConnection) -> tuple[dict[str, Any], bytes | None]:
    header = json.loads(ws.recv())
    if header.get("type") != "frame":
        raise RuntimeError(f"unexpected reply {header}")
    if not header.get("image"):
        return header, None
    jpeg = ws.recv()
    if not isinstance(jpeg, bytes):
        raise RuntimeError("expected a JPEG after the header")
    return header, jpeg


def lockstep(
    url: str, key: str, messages: Sequence[bytes], fps: float
) -> tuple[dict[str, Any], list[np.ndarray | None]]:
    """Send each message after the previous reply, at most `fps` a second; per-frame round
    trips (send -> JPEG received) and the replies' server-side numbers."""
    rtt, server, render = [], [], []
    images: list[np.ndarray | None] = []
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        for message in messages:
            start = time.perf_counter()
            ws.send(message)
            header, jpeg = _reply(ws)
            rtt.append(1000 * (time.perf_counter() - start))
            server.append(header["latency_ms"])
            if "render_ms" in header:
                render.append(header["render_ms"])
            images.append(None if jpeg is None else _decode(jpeg))
            time.sleep(max(0.0, 1 / fps - (time.perf_counter() - start)))
    report = {
        "frames": len(messages),
        "images": sum(i is not None for i in images),
        "rtt_ms": _summary(rtt),
        "server_latency_ms": _summary(server),
    }
    if render:
        report["server_render_ms"] = _summary(render)
    return report, images


def run(url: str, key: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    photo = tmp / "photo.jpg"
    photo.write_bytes(_jpeg(astronaut(), 92))
    with Client(url, key, timeout_s=600) as client:
        avatar_id = args.avatar
        if avatar_id is None:
            created = client.create_avatar([photo], name="bench")
            job = client.wait(created["job"]["id"], timeout_s=600)
            if job["status"] != "succeeded":
                raise RuntimeError(f"avatar job {job['status']}: {job.get('error')}")
            avatar_id = created["avatar"]["id"]
        contract = client.pose_encoder_contract()
        files: dict[str, Path] = {}
        downloads_s: dict[str, float] = {}
        for precision in ("fp32", "fp16"):
            start = time.perf_counter()
            files[precision] = client.download(
                contract["files"][precision], tmp / f"{precision}.onnx"
            )
            downloads_s[precision] = round(time.perf_counter() - start, 2)

    frames = webcam_frames(args.frames)
    size, dim = contract["image_size"], contract["pose_dim"]

    # --- client side: crop, encode -----------------------------------------------------------
    cropper = ContractCropper(contract)
    crop_ms, crops = [], []
    try:
        for frame in frames:
            start = time.perf_counter()
            crop = cropper(frame, time.monotonic())
            crop_ms.append(1000 * (time.perf_counter() - start))
            if crop is None:
                raise RuntimeError("no face in a benchmark frame")
            crops.append(crop.transpose(2, 0, 1))
    finally:
        cropper.close()
    crop_arr = np.ascontiguousarray(np.stack(crops))  # (N, 3, S, S)
    encoder = {
        f"{precision}_{'1_thread' if threads else 'default_threads'}": _summary(
            encoder_times(files[precision], crop_arr, threads)
        )
        for precision in ("fp32", "fp16")
        for threads in (1, None)
    }
    if args.official_encoder:
        encoder["official_256_random_weights"] = official_encoder_times(crop_arr, tmp)
    import onnxruntime as ort

    session = ort.InferenceSession(str(files["fp16"]), providers=["CPUExecutionProvider"])
    poses = session.run(None, {contract["input"]["name"]: crop_arr})[0]
    pose_messages = [p.astype("<f2").tobytes() for p in poses]
    jpeg_messages = [_jpeg(f) for f in frames]
    jpeg_encode_ms = _time_ms(lambda: _jpeg(frames[0]), 20)

    # --- bytes up the wire ---------------------------------------------------------------
    def sizes(messages: Sequence[bytes]) -> dict[str, float]:
        n = np.array([len(m) for m in messages], dtype=np.float64)
        wire = n + np.array([_ws_overhead(len(m)) for m in messages])
        return {"payload_mean": round(float(n.mean()), 1), "ws_frame_mean": float(wire.mean())}

    pans = panning_frames(args.frames, size=256)
    bytes_per_frame = {
        "pose_fp16": sizes(pose_messages),
        "jpeg_640x480": sizes(jpeg_messages),
        "jpeg_256x256": sizes([_jpeg(f) for f in pans]),
        f"jpeg_crop_{size}x{size}": sizes([_jpeg(c.transpose(1, 2, 0)) for c in crops]),
    }
    ratio = bytes_per_frame["jpeg_640x480"]["payload_mean"] / (2 * dim)

    # --- the two modes, same frames, one after the other ---------------------------------
    base = url.replace("http://", "ws://").rstrip("/") + f"/v1/avatars/{avatar_id}/stream"
    frames_report, frames_images = lockstep(base, key, jpeg_messages, args.fps)
    pose_url = f"{base}?mode=pose&version={contract['version']}"
    pose_report, pose_images = lockstep(pose_url, key, pose_messages, args.fps)
    both = [
        np.abs(a.astype(np.float32) - b.astype(np.float32)).mean()
        for a, b in zip(frames_images, pose_images, strict=True)
        if a is not None and b is not None
    ]
    encode_p50 = encoder["fp16_default_threads"]["p50"] or 0.0
    return {
        "contract": {k: contract[k] for k in ("version", "image_size", "pose_dim", "wire")},
        "onnx_file_bytes": {p: f.stat().st_size for p, f in files.items()},
        "first_downloads_s": downloads_s,
        "bytes_per_frame": bytes_per_frame,
        "jpeg_quality": JPEG_QUALITY,
        "jpeg_640x480_over_pose": round(ratio, 1),
        "client_cpu_ms": {
            "detect_and_crop": _summary(crop_ms),
            "pose_encoder": encoder,
            "jpeg_encode_640x480": _summary(jpeg_encode_ms),
        },
        "loopback_lockstep": {
            "fps_cap": args.fps,
            "frames_mode": frames_report,
            "pose_mode": pose_report,
            "pose_mode_client_plus_rtt_p50_ms": round(
                float(np.median(crop_ms)) + encode_p50 + (pose_report["rtt_ms"]["p50"] or 0.0), 2
            ),
        },
        "frames_vs_pose_render_mean_abs_diff": round(float(np.mean(both)), 2) if both else None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pose_stream", description=__doc__)
    parser.add_argument("--url", help="a running stack (default: start one)")
    parser.add_argument("--key", help="its API key (with --url)")
    parser.add_argument("--avatar", help="a ready avatar of that key (default: make one)")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--fps", type=float, default=10.0, help="lockstep cap per mode")
    parser.add_argument(
        "--no-official-encoder",
        dest="official_encoder",
        action="store_false",
        help="skip timing an official-256-sized encoder",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if bool(args.url) != bool(args.key):
        parser.error("--url and --key go together")

    with tempfile.TemporaryDirectory(prefix="lpd-bench-") as tmp:
        if args.url:
            report = run(args.url, args.key, args, Path(tmp))
            stack: dict[str, Any] = {"url": args.url}
        else:
            config = LocalStackConfig(
                port=free_port(),
                root=Path(tmp) / "stack",
                settings={"rate_limit_per_minute": 10_000_000},
            )
            with LocalStack(config) as local:
                report = run(local.url, local.api_key, args, Path(tmp))
            stack = {
                "started": "deploy.local: uvicorn (1 process), 1 Celery worker, tritonserver "
                "(python backend, demo-tiny-64, CPU), SQLite, Redis",
                "rate_limit": "lifted for the benchmark",
            }
    fb, lock = report["bytes_per_frame"], report["loopback_lockstep"]
    table = (
        f"bytes/frame: pose {fb['pose_fp16']['payload_mean']:.0f}, JPEG 640x480 "
        f"{fb['jpeg_640x480']['payload_mean']:.0f} ({report['jpeg_640x480_over_pose']}x)\n"
        f"rtt p50: frames {lock['frames_mode']['rtt_ms']['p50']} ms, pose "
        f"{lock['pose_mode']['rtt_ms']['p50']} ms; server render p50 "
        f"{lock['pose_mode']['server_render_ms']['p50']} ms"
    )
    host = {"cpus": os.cpu_count(), "load_average_1m_at_end": round(os.getloadavg()[0], 2)}
    emit({"cpu": cpu_name(), "host": host, "stack": stack, **report}, args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
