"""A stream client that times `WS /v1/avatars/{id}/stream` (service/api/routes/stream.py) from
the outside: per-frame round trips as a webcam client sees them, and the server's drops.

Import `measure_stream` (the API load benchmark runs many at once), or run
`python -m benchmarks.ws_client ws://127.0.0.1:8080/v1/avatars/ID/stream --token KEY
--image face.jpg --frames 100 --fps 25`. JSON goes to stdout (and --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from benchmarks.report import emit

MAX_REPLY_BYTES = 16 * 1024 * 1024  # a pasted-back 4K frame is larger than websockets' 1 MiB


def _summary(values_ms: Sequence[float]) -> dict[str, float | None]:
    if not values_ms:
        return {"p50": None, "p90": None, "p99": None, "mean": None, "max": None}
    a = np.asarray(values_ms, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {
        "p50": round(float(p50), 2),
        "p90": round(float(p90), 2),
        "p99": round(float(p99), 2),
        "mean": round(float(a.mean()), 2),
        "max": round(float(a.max()), 2),
    }


async def measure_stream(
    url: str,
    token: str,
    frames: Sequence[bytes],
    *,
    fps: float | None = None,
    paste_back: bool = False,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Send `frames` (JPEG bytes) at `fps` (None: as fast as the socket takes them) and time
    each reply from sending frame `seq` to receiving its JPEG (its header if it has none).

    Returns counts (`replies`, `images`, `errors` by code, `dropped` as the server last
    reported it), `rtt_ms` and `server_latency_ms` summaries (p50/p90/p99/mean/max), rates,
    and `close_code` if the server closed the stream early. Raises
    `websockets.exceptions.InvalidStatus` if the handshake is refused (bad key: 403).
    """
    if not frames:
        raise ValueError("no frames to send")
    last = len(frames) - 1
    sent: dict[int, float] = {}
    rtt_ms: list[float] = []
    server_ms: list[float] = []
    errors: Counter[str] = Counter()
    state: dict[str, Any] = {"replies": 0, "images": 0, "dropped": 0, "close_code": None}
    headers = {"Authorization": f"Bearer {token}"}

    async with connect(url, additional_headers=headers, max_size=MAX_REPLY_BYTES) as ws:
        if paste_back:
            await ws.send(json.dumps({"type": "config", "paste_back": True}))
            ack = json.loads(await asyncio.wait_for(ws.recv(), timeout_s))
            if ack.get("type") != "config":
                raise RuntimeError(f"the server did not accept the config: {ack}")

        async def read_replies() -> None:
            pending: dict[str, Any] | None = None  # a header whose JPEG is next
            try:
                async for message in ws:
                    now = time.perf_counter()
                    if isinstance(message, bytes):
                        if pending is None:
                            raise RuntimeError("a JPEG arrived without its header")
                        state["images"] += 1
                        rtt_ms.append(1000 * (now - sent[pending["seq"]]))
                        done, pending = pending["seq"] == last, None
                        if done:
                            return
                        continue
                    body = json.loads(message)
                    if body.get("type") == "error":
                        errors[body["code"]] += 1
                        if body.get("seq") == last:
                            return
                    elif body.get("type") == "frame":
                        state["replies"] += 1
                        state["dropped"] = body["dropped"]
                        server_ms.append(body["latency_ms"])
                        if body["image"]:
                            pending = body
                            continue
                        rtt_ms.append(1000 * (now - sent[body["seq"]]))
                        if body["seq"] == last:
                            return
            except ConnectionClosed:
                pass
            state["close_code"] = ws.close_code

        reader = asyncio.create_task(read_replies())
        start = time.perf_counter()
        try:
            for seq, frame in enumerate(frames):
                if fps:
                    await asyncio.sleep(max(0.0, start + seq / fps - time.perf_counter()))
                sent[seq] = time.perf_counter()
                await ws.send(frame)
            sent_s = time.perf_counter() - start
            await asyncio.wait_for(reader, timeout_s)
        except ConnectionClosed:
            sent_s = time.perf_counter() - start
            state["close_code"] = ws.close_code
        finally:
            reader.cancel()
        elapsed = time.perf_counter() - start

    return {
        "frames": len(frames),
        "replies": state["replies"],
        "images": state["images"],
        "dropped": state["dropped"],
        "errors": dict(errors),
        "close_code": state["close_code"],
        "rtt_ms": _summary(rtt_ms),
        "server_latency_ms": _summary(server_ms),
        "sent_fps": round(max(len(frames) - 1, 1) / max(sent_s, 1e-9), 2),  # intervals / time
        "reply_fps": round(state["replies"] / max(elapsed, 1e-9), 2),
        "duration_s": round(elapsed, 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url", help="ws://host:port/v1/avatars/AVATAR_ID/stream")
    parser.add_argument("--token", required=True, help="an API key (lpd_...)")
    parser.add_argument("--image", type=Path, required=True, help="a JPEG sent as every frame")
    parser.add_argument("--frames", type=int, default=100)
    parser.add_argument("--fps", type=float, default=25.0, help="0: as fast as possible")
    parser.add_argument("--paste-back", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    frames = [args.image.read_bytes()] * args.frames
    report = asyncio.run(
        measure_stream(
            args.url, args.token, frames, fps=args.fps or None, paste_back=args.paste_back
        )
    )
    emit(report, args.out)


if __name__ == "__main__":
    main()
