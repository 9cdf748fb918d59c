"""Many concurrent clients against a real uvicorn server: every request is answered.

Regression test: request sessions once held their connection into FastAPI's response
validation (a second thread-pool turn); at 200 pollers every thread waited for a connection
held by a request waiting for a thread, and requests failed after the 30 s pool timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.api_load import poll_load
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.main import create_app
from service.models import Job, JobKind
from tests.live_server import serve

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
    with serve(app) as url:
        with session_scope(app.state.sessions) as session:
            tenant = create_tenant(session, "acme")
            key, _ = create_api_key(session, tenant, "load")
            job = Job(tenant_id=tenant.id, kind=JobKind.PREPROCESS, params={})
            session.add(job)
            session.flush()
            job_id = job.id
        yield url, key, job_id


def test_many_pollers_are_all_answered(server: tuple[str, str, str]) -> None:
    url, key, job_id = server
    result = asyncio.run(poll_load(url, key, job_id, clients=150, seconds=3.0))
    assert result["errors"] == 0, result
    assert result["requests"] >= 150
    assert result["p99_ms"] < 20_000  # queueing, never the pool's 30 s timeout
