"""The whole service end to end, every part real: the API (TestClient on create_app), one
Celery worker process on all queues with beat inside, a Redis server and a tritonserver of
this module's own (so they can be stopped and restarted), PostgreSQL (a schema of its own),
and a local HTTP server receiving the webhooks.

Flow: a photo -> an avatar fine-tuned by the worker -> a driver video with audio reenacted
through Triton -> an MP4 with the driver's frame count and audio length, a WebM with alpha,
signed webhooks; then cancel, Redis down and Triton down (typed 503s, recovery).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import select

from deploy.triton.export import RepositoryConfig, build_repository
from deploy.triton.serve import ServerConfig, TritonServer, free_port
from media.video import probe, read_frames
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import create_db_engine, create_session_factory, session_scope
from service.main import create_app
from service.models import WebhookDelivery
from service.queue import CeleryQueue, create_celery
from service.webhooks import SIGNATURE_HEADER, verify_signature, webhook_secret
from tests.integration.conftest import DEMO, postgres_schema
from tests.integration.test_reenact_worker import audio_seconds
from tests.integration.test_workers import Worker
from tests.media_samples import astronaut, encode_clip, panning_frames, tone
from tests.unit.test_avatars_api import encode

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TIMEOUT_S = 300.0  # 2 CPU cores
FRAMES, FPS = 20, 10


class Receiver:
    """A webhook endpoint on loopback that records what it is sent."""

    def __init__(self) -> None:
        self.received: list[tuple[Message, bytes]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append((self.headers, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, job_id: str) -> list[tuple[Message, dict[str, Any]]]:
        out = []
        for headers, body in list(self.received):
            event = json.loads(body)
            if event["data"]["job"]["id"] == job_id:
                out.append((headers, event))
        return out


class RedisServer:
    """A throwaway redis-server (no persistence) that the test may stop and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while (
            subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True
            ).stdout.strip()
            != b"PONG"
        ):
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Service:
    settings: Settings
    client: TestClient
    headers: dict[str, str]
    tenant_id: str
    worker: Worker
    redis: RedisServer
    triton_config: ServerConfig
    triton: TritonServer
    receiver: Receiver

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def wait(self, job_id: str, until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + TIMEOUT_S
        job = self.job(job_id)
        while not until(job):
            if time.monotonic() > deadline:
                pytest.fail(f"job stuck at {job}\n--- worker ---\n{self.worker.tail()}")
            time.sleep(0.3)
            job = self.job(job_id)
        return job

    def reenact(self, video: bytes, avatar_id: str, **fields: Any) -> dict[str, Any]:
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
        r = self.client.post(
            "/v1/reenactments",
            files=[("video", ("driver.mp4", video, "video/mp4"))],
            data={"avatar_id": avatar_id, "callback_url": self.receiver.url, **data},
            headers=self.headers,
        )
        assert r.status_code == 202, r.text
        return dict(r.json())

    def restart_triton(self) -> None:
        self.triton = TritonServer(self.triton_config)
        self.triton.__enter__()


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    with postgres_schema("lpd_e2e") as url:
        yield url


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, pg_url: str) -> Iterator[Service]:
    tmp = tmp_path_factory.mktemp("e2e")
    served = tmp / "served-avatars"
    served.mkdir()
    repository = build_repository(
        DEMO, tmp / "repository", RepositoryConfig(threads=1, avatar_dir=served)
    )
    triton_config = ServerConfig(
        repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    )
    triton = TritonServer(triton_config)
    triton.__enter__()
    redis_server = RedisServer(free_port())
    redis_server.start()
    receiver = Receiver()
    values: dict[str, Any] = {
        "database_url": pg_url,
        "redis_url": f"redis://127.0.0.1:{redis_server.port}/0",
        "triton_url": triton.grpc_url,
        "triton_timeout_s": 30.0,
        "artifacts_dir": str(tmp / "artifacts"),
        "served_avatars_dir": str(served),
        "base_checkpoint": str(DEMO),
        "required_queues": ["preprocess", "finetune", "reenact", "events"],
        "progress_interval_s": 0.2,
        "readiness_timeout_s": 2.0,
        "task_retry_backoff_s": 1.0,
        "task_max_retries": 6,
        "signed_url_secret": "e2e-secret",
        "webhook_allow_private_hosts": True,
        "webhook_sweep_interval_s": 1.0,
        "reenact_batch": 8,
    }
    settings = Settings(**values)
    env = {
        **os.environ,
        **{
            f"LPD_{k.upper()}": json.dumps(v) if isinstance(v, list | bool) else str(v)
            for k, v in values.items()
        },
    }
    engine = create_db_engine(pg_url)
    with session_scope(create_session_factory(engine)) as session:
        tenant = create_tenant(session, "acme")
        key, _ = create_api_key(session, tenant, "e2e")
        tenant_id = tenant.id
    engine.dispose()

    worker = Worker(
        env,
        tmp / "worker.log",
        "all",
        queues="preprocess,finetune,reenact,events",
        beat_schedule=tmp / "beat-schedule",
    )
    worker.start()
    queue = CeleryQueue(create_celery(settings))
    servers = [triton]  # restart_triton adds one
    try:
        deadline = time.monotonic() + 120
        while queue.workers_per_queue(1.0).get("reenact", 0) < 1:
            assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
            assert time.monotonic() < deadline, worker.tail()
        with TestClient(create_app(settings)) as client:
            service = Service(
                settings,
                client,
                {"Authorization": f"Bearer {key}"},
                tenant_id,
                worker,
                redis_server,
                triton_config,
                triton,
                receiver,
            )
            yield service
            servers.append(service.triton)
    finally:
        queue.app.close()
        worker.kill(signal.SIGTERM)
        redis_server.stop()
        for server in servers:
            server.stop()  # idempotent


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("driver") / "driver.mp4"
    return encode_clip(
        path, panning_frames(FRAMES, size=160), fps=FPS, audio=tone(FRAMES / FPS)
    ).read_bytes()


@pytest.fixture(scope="module")
def avatar(service: Service) -> str:
    """A photo made into a light fine-tuned avatar by the worker."""
    photo = encode(Image.fromarray(astronaut()))
    r = service.client.post(
        "/v1/avatars",
        files=[("photos", ("me.jpg", photo, "image/jpeg"))],
        data={"name": "astronaut", "fine_tune": "light", "steps": "3"},
        headers=service.headers,
    )
    assert r.status_code == 202, r.text
    job = service.wait(r.json()["job"]["id"], finished)
    assert job["status"] == "succeeded", (job, service.worker.tail())
    avatar = service.client.get(job["result"]["avatar"], headers=service.headers).json()
    assert avatar["fine_tuned"] is True
    return str(avatar["id"])


def test_photo_to_reenacted_video_with_audio_and_signed_webhook(
    service: Service, avatar: str, driver: bytes, tmp_path: Path
) -> None:
    job = service.reenact(driver, avatar)
    job = service.wait(job["id"], finished)
    assert job["status"] == "succeeded", (job, service.worker.tail())
    assert job["result"]["frames"] == FRAMES and job["result"]["audio"] is True

    video = tmp_path / "out.mp4"
    r = service.client.get(job["result"]["video_url"])  # the signed link: no API key
    assert r.status_code == 200
    video.write_bytes(r.content)
    info = probe(video)
    assert (info.num_frames, info.fps, info.audio_codec) == (FRAMES, FPS, "aac")
    assert abs(audio_seconds(video) - FRAMES / FPS) < 0.1

    secret = webhook_secret(service.settings, service.tenant_id)
    deadline = time.monotonic() + 60
    while not service.receiver.events(job["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    [(headers, event)] = service.receiver.events(job["id"])
    assert event["type"] == "job.succeeded"
    body = json.dumps(event).encode()  # re-serialised: check the raw bytes below instead
    raw = next(b for h, b in service.receiver.received if json.loads(b)["id"] == event["id"])
    assert verify_signature(secret, headers[SIGNATURE_HEADER], raw)
    assert not verify_signature(secret, headers[SIGNATURE_HEADER], body + b" ")
    engine = create_db_engine(service.settings.database_url)
    with session_scope(create_session_factory(engine)) as session:
        row = session.scalar(select(WebhookDelivery).where(WebhookDelivery.job_id == job["id"]))
        assert row is not None and row.delivered_at is not None and row.status_code == 204
    engine.dispose()


def test_webm_output_decodes_with_alpha(
    service: Service, avatar: str, driver: bytes, tmp_path: Path
) -> None:
    job = service.wait(service.reenact(driver, avatar, output="webm")["id"], finished)
    assert job["status"] == "succeeded", (job, service.worker.tail())
    r = service.client.get(job["result"]["video"], headers=service.headers)
    assert r.headers["content-type"] == "video/webm"
    (tmp_path / "out.webm").write_bytes(r.content)
    rgba = np.stack([f.image for f in read_frames(tmp_path / "out.webm", alpha=True)])
    assert rgba.shape == (FRAMES, 64, 64, 4)
    assert rgba[..., 3].min() < 10 and rgba[..., 3].max() > 200


def test_cancel_a_reenactment(service: Service, avatar: str, driver: bytes) -> None:
    job = service.reenact(driver, avatar)
    r = service.client.post(f"/v1/jobs/{job['id']}/cancel", headers=service.headers)
    assert (r.status_code, r.json()["status"]) == (200, "canceled")
    time.sleep(3)  # the worker gets the task and must leave it alone
    job = service.job(job["id"])
    assert job["status"] == "canceled" and job["result"] is None
    deadline = time.monotonic() + 60
    while not service.receiver.events(job["id"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [e["type"] for _, e in service.receiver.events(job["id"])] == ["job.canceled"]


def test_redis_down_is_503_then_recovers(service: Service, avatar: str, driver: bytes) -> None:
    service.redis.stop()
    try:
        r = service.client.post(
            "/v1/reenactments",
            files=[("video", ("d.mp4", driver, "video/mp4"))],
            data={"avatar_id": avatar},
            headers=service.headers,
        )
        assert r.status_code == 503 and r.headers["Retry-After"], r.text
        assert r.json()["error"]["code"] == "queue_unavailable"
        ready = service.client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["Retry-After"]
    finally:
        service.redis.start()
    job = service.wait(service.reenact(driver, avatar)["id"], finished)
    assert job["status"] == "succeeded", (job, service.worker.tail())


def test_triton_down_is_503_then_the_job_recovers(
    service: Service, avatar: str, driver: bytes
) -> None:
    service.triton.stop()
    try:
        ready = service.client.get("/readyz")
        assert ready.status_code == 503, ready.text
        job = service.reenact(driver, avatar)  # accepted: the queue is up
        # The worker hits the dead server and retries with backoff (transient error).
        service.wait(job["id"], lambda j: j["stage"] == "retrying" or finished(j))
    finally:
        service.restart_triton()
    job = service.wait(job["id"], finished)
    assert job["status"] == "succeeded", (job, service.worker.tail())
    assert job["attempts"] >= 2
    assert service.client.get("/readyz").status_code == 200
