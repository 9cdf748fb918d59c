"""`reenact stream`: frames from a webcam or a video file through `WS /v1/avatars/{id}/stream`,
one at a time (each sent after the previous answer, at most `fps` a second), the answers
optionally saved as a video."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from websockets.sync.client import connect

from cli.api import ApiError
from media.video import VideoWriter, read_frames


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
    Image.fromarray(rgb).save(buf, "JPEG", quality=85)
    return buf.getvalue()


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
    ws_url = url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
    ws_url += f"/v1/avatars/{avatar_id}/stream"
    latencies: list[float] = []
    writer: VideoWriter | None = None
    sent = 0
    with connect(ws_url, additional_headers={"Authorization": f"Bearer {key}"}) as ws:
        try:
            for rgb in _frames(source):
                if max_frames is not None and sent >= max_frames:
                    break
                start = time.perf_counter()
                ws.send(_jpeg(rgb))
                sent += 1
                header = json.loads(ws.recv())
                if header.get("type") == "error":
                    raise ApiError(0, header["code"], header["message"])
                if header.get("image"):
                    reply = ws.recv()
                    if not isinstance(reply, bytes):
                        raise ApiError(0, "protocol_error", "expected a JPEG after the header")
                    image = np.asarray(Image.open(io.BytesIO(reply)).convert("RGB"))
                    latencies.append(1000 * (time.perf_counter() - start))
                    if out is not None:
                        if writer is None:
                            writer = VideoWriter(out, fps, image.shape[1], image.shape[0])
                        writer.write(image)
                time.sleep(max(0.0, 1 / fps - (time.perf_counter() - start)))
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
    if writer is not None:
        writer.close()
    if not latencies:
        return f"{sent} frames sent, none answered with a face"
    p50, p99 = np.percentile(latencies, [50, 99])
    return (
        f"{sent} frames, {len(latencies)} rendered, round trip p50 {p50:.0f} ms, p99 {p99:.0f} ms"
    )
