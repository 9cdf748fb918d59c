"""A canceled job's webhook, end to end: the API (TestClient) records the outbox row, a real
Celery worker on the `events` queue with embedded beat (`-B`) sweeps it onto Redis (DB 6,
flushed first), delivers it, and a local HTTP server checks the signature."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import create_db_engine, create_session_factory, migrate, session_scope
from service.main import create_app
from service.models import Job, JobKind, WebhookDelivery
from service.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    verify_signature,
    webhook_secret,
)
from tests.integration.test_workers import Worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/6"
TIMEOUT_S = 120.0  # worker start (imports) plus a sweep, on 2 shared cores


def test_a_canceled_job_s_webhook_arrives_signed(tmp_path: Path) -> None:
    broker = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        broker.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    broker.flushdb()  # DB 6 is this test's alone

    received: list[tuple[Message, bytes]] = []
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.headers, body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
            arrived.set()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    callback = f"http://127.0.0.1:{server.server_address[1]}/hooks/lpd"

    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp_path / 'lpd.db'}",
        "redis_url": REDIS_URL,
        "artifacts_dir": str(tmp_path / "artifacts"),
        "required_queues": [],
        "signed_url_secret": "e2e-secret",
        "webhook_allow_private_hosts": True,
        "webhook_sweep_interval_s": 0.5,
    }
    migrate(values["database_url"])
    settings = Settings(**values)
    env = {
        **os.environ,
        **{
            f"LPD_{k.upper()}": json.dumps(v) if isinstance(v, list | bool) else str(v)
            for k, v in values.items()
        },
    }
    engine = create_db_engine(settings.database_url)
    sessions = create_session_factory(engine)
    with session_scope(sessions) as session:
        tenant = create_tenant(session, "acme")
        key, _ = create_api_key(session, tenant, "it")
        job = Job(tenant_id=tenant.id, kind=JobKind.PREPROCESS, params={}, callback_url=callback)
        session.add(job)
        session.flush()
        tenant_id, job_id = tenant.id, job.id

    # The webhook and upkeep worker, with beat inside (its schedule file not in the repo).
    worker = Worker(
        env, tmp_path / "worker.log", "events", queues="events", beat_schedule=tmp_path / "beat"
    )
    worker.start()
    try:
        with TestClient(create_app(settings)) as client:
            r = client.post(f"/v1/jobs/{job_id}/cancel", headers={"Authorization": f"Bearer {key}"})
            assert (r.status_code, r.json()["status"]) == (200, "canceled"), r.text

        log = tmp_path / "worker.log"
        assert arrived.wait(TIMEOUT_S), log.read_text(errors="replace")[-4000:]
        (headers, body), *_ = received
        secret = webhook_secret(settings, tenant_id)
        assert verify_signature(secret, headers[SIGNATURE_HEADER], body)
        event = json.loads(body)
        assert headers[EVENT_HEADER] == event["type"] == "job.canceled"
        assert headers[DELIVERY_HEADER] == event["id"]
        assert event["data"]["job"]["id"] == job_id
        assert event["data"]["job"]["status"] == "canceled"

        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with sessions() as session:
                row = session.get(WebhookDelivery, event["id"])
                if row is not None and row.delivered_at is not None:
                    break
            time.sleep(0.2)
        assert row is not None and row.delivered_at is not None, log.read_text()[-4000:]
        assert (row.status_code, row.attempts, row.job_id) == (200, 1, job_id)
        time.sleep(1.5)  # a few more sweeps: a delivered event is not sent again
        assert len(received) == 1
    finally:
        worker.kill(signal.SIGTERM)
        server.shutdown()
        server.server_close()
        engine.dispose()
        broker.flushdb()
