"""Load on the running service over loopback, measured from the client side:

1. job-status polling (`GET /v1/jobs/{id}`): throughput and p50/p99 latency with 50 and 200
   concurrent clients (aiohttp, one connection each);
2. the live stream (`WS /v1/avatars/{id}/stream`): round trip per frame (benchmarks.ws_client);
3. end to end: a 10 s driver video with audio, from upload to the downloaded MP4.

By default it starts the whole stack itself (deploy.local: Redis, SQLite, tritonserver with
the demo checkpoint, one Celery worker, uvicorn) with the rate limit lifted, so the numbers
are the service's, not the limiter's. `--url/--key` measure a stack that is already running.

    python -m benchmarks.api_load --out benchmarks/results/api_load_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

from benchmarks.report import cpu_name, emit
from benchmarks.ws_client import measure_stream
from deploy.local import LocalStack, LocalStackConfig
from deploy.triton.serve import free_port
from tests.media_samples import astronaut, encode_clip, panning_frames, tone

FINISHED = ("succeeded", "failed", "canceled")


def _percentiles(ms: Sequence[float]) -> dict[str, float]:
    a = np.asarray(ms, dtype=np.float64)
    p50, p99 = np.percentile(a, [50, 99])
    return {"p50_ms": round(float(p50), 2), "p99_ms": round(float(p99), 2)}


class Api:
    def __init__(self, session: aiohttp.ClientSession, url: str, key: str) -> None:
        self.session, self.url = session, url.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}"}

    async def json(self, method: str, path: str, **kw: Any) -> Any:
        async with self.session.request(method, self.url + path, headers=self.headers, **kw) as r:
            body = await r.json()
            if r.status >= 400:
                raise RuntimeError(f"{method} {path}: {r.status} {body}")
            return body

    async def wait(self, job_id: str, timeout_s: float = 600) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            job = await self.json("GET", f"/v1/jobs/{job_id}")
            if job["status"] in FINISHED:
                if job["status"] != "succeeded":
                    raise RuntimeError(f"job {job_id} {job['status']}: {job['error']}")
                return dict(job)
            await asyncio.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not finish")

    async def avatar(self, photo: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("photos", photo, filename="me.jpg", content_type="image/jpeg")
        created = await self.json("POST", "/v1/avatars", data=form)
        await self.wait(created["job"]["id"])
        return str(created["avatar"]["id"])

    async def reenact(self, avatar_id: str, video: bytes) -> str:
        form = aiohttp.FormData()
        form.add_field("avatar_id", avatar_id)
        form.add_field("video", video, filename="driver.mp4", content_type="video/mp4")
        return str((await self.json("POST", "/v1/reenactments", data=form))["id"])


async def poll_load(
    url: str, key: str, job_id: str, clients: int, seconds: float
) -> dict[str, Any]:
    """`clients` loops of GET /v1/jobs/{id} for `seconds`, each on its own connection."""
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {key}"}
    target = f"{url.rstrip('/')}/v1/jobs/{job_id}"
    stop_at = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal errors
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                try:
                    async with session.get(target, headers=headers) as r:
                        await r.read()
                        ok = r.status == 200
                except aiohttp.ClientError:
                    ok = False
                if ok:
                    latencies.append(1000 * (time.perf_counter() - start))
                else:
                    errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    elapsed = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": round(len(latencies) / elapsed, 1),
        **_percentiles(latencies),
    }


def _jpeg(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=90)
    return buf.getvalue()


async def run(args: argparse.Namespace, url: str, key: str, tmp: Path) -> dict[str, Any]:
    photo = _jpeg(astronaut())
    driver_s = args.driver_seconds
    fps = 25
    n = int(driver_s * fps)
    driver = encode_clip(
        tmp / "driver.mp4", panning_frames(n, size=256), fps=fps, audio=tone(driver_s)
    ).read_bytes()
    report: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        api = Api(session, url, key)
        avatar_id = await api.avatar(photo)

        # 3. end to end (first, on an idle stack)
        start = time.perf_counter()
        job = await api.wait(await api.reenact(avatar_id, driver))
        async with session.get(url + job["result"]["video"], headers=api.headers) as r:
            size = len(await r.read())
        e2e = time.perf_counter() - start
        report["end_to_end"] = {
            "driver_seconds": driver_s,
            "driver_frames": n,
            "driver_size": "256x256 H.264 + AAC",
            "output": "64x64 MP4 + matte (demo checkpoint)",
            "seconds": round(e2e, 2),
            "realtime_factor": round(driver_s / e2e, 2),
            "result_bytes": size,
        }

    # 1. polling
    report["job_polling"] = [
        await poll_load(url, key, job["id"], clients, args.poll_seconds) for clients in args.clients
    ]

    # 2. live stream: a face that moves, as a webcam would send it
    frames = [_jpeg(f) for f in panning_frames(args.stream_frames, size=256)]
    ws_url = url.replace("http://", "ws://") + f"/v1/avatars/{avatar_id}/stream"
    report["stream"] = {
        "unpaced": await measure_stream(ws_url, key, frames),
        f"paced_{args.stream_fps:g}fps": await measure_stream(
            ws_url, key, frames, fps=args.stream_fps
        ),
    }
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.api_load", description=__doc__)
    parser.add_argument("--url", help="a running stack (default: start one)")
    parser.add_argument("--key", help="its API key (with --url)")
    parser.add_argument("--clients", type=int, nargs="+", default=[50, 200])
    parser.add_argument("--poll-seconds", type=float, default=10.0)
    parser.add_argument("--driver-seconds", type=float, default=10.0)
    parser.add_argument("--stream-frames", type=int, default=100)
    parser.add_argument("--stream-fps", type=float, default=10.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if bool(args.url) != bool(args.key):
        parser.error("--url and --key go together")

    with tempfile.TemporaryDirectory(prefix="lpd-bench-") as tmp:
        if args.url:
            report = asyncio.run(run(args, args.url, args.key, Path(tmp)))
            stack_info = {"url": args.url}
        else:
            config = LocalStackConfig(
                port=free_port(),
                root=Path(tmp) / "stack",
                settings={"rate_limit_per_minute": 10_000_000, "max_active_jobs_per_tenant": 100},
            )
            with LocalStack(config) as stack:
                report = asyncio.run(run(args, stack.url, stack.api_key, Path(tmp)))
            stack_info = {
                "started": "deploy.local: uvicorn (1 process), 1 Celery worker, tritonserver "
                "(python backend, demo-tiny-64, CPU), SQLite, Redis",
                "rate_limit": "lifted for the benchmark",
            }
    table = "\n".join(
        f"poll x{p['clients']:>3}: {p['requests_per_s']:>7} req/s  p50 {p['p50_ms']} ms  "
        f"p99 {p['p99_ms']} ms  errors {p['errors']}"
        for p in report["job_polling"]
    )
    emit({"cpu": cpu_name(), "stack": stack_info, **report}, args.out, table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
