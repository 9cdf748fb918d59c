"""Many concurrent clients against a real uvicorn server: every request is answered.

Regression test: request sessions once held their connection into FastAPI's response
validation (a second thread-pool turn); at 200 pollers every thread waited for a connection
held by a request waiting for a thread, and requests failed after the 30 s pool timeout.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from benchmarks.api_load import poll_load
from deploy.triton.serve import free_port
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.main import create_app
from service.models import Job, JobKind

pytestmark = pytest.mark.integration


@pytest.fixture
def server(db_url: str, tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(base URL, API key, a job id) of a live server with a small connection pool."""
    settings = Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",  # rate limiter fails open: not what is measured
        required_queues=(),
        db_pool_size=2,
        db_max_overflow=20,
    )
    app = create_app(settings)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    with session_scope(app.state.sessions) as session:
        tenant = create_tenant(session, "acme")
        key, _ = create_api_key(session, tenant, "load")
        job = Job(tenant_id=tenant.id, kind=JobKind.PREPROCESS, params={})
        session.add(job)
        session.flush()
        job_id = job.id
    yield f"http://127.0.0.1:{port}", key, job_id
    uv.should_exit = True
    thread.join(timeout=10)


def test_many_pollers_are_all_answered(server: tuple[str, str, str]) -> None:
    url, key, job_id = server
    result = asyncio.run(poll_load(url, key, job_id, clients=150, seconds=3.0))
    assert result["errors"] == 0, result
    assert result["requests"] >= 150
    assert result["p99_ms"] < 20_000  # queueing, never the pool's 30 s timeout
