"""The service's database layer on the real PostgreSQL, and /readyz against the real Redis.

Each test gets its own schema in database `test` (dropped afterwards), so reruns start clean.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from fastapi.testclient import TestClient
from sqlalchemy import inspect
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.config import Settings
from service.db import create_db_engine, create_session_factory, migrate, session_scope
from service.main import create_app
from service.models import Base, Job, JobKind, JobStatus, Tenant
from tests.integration.conftest import postgres_schema

pytestmark = pytest.mark.integration

REDIS = "redis://127.0.0.1:6379/0"


@pytest.fixture
def pg_url() -> Iterator[str]:
    with postgres_schema() as url:
        yield url


@pytest.fixture
def sessions(pg_url: str) -> Iterator[sessionmaker[Session]]:
    engine = create_db_engine(pg_url)
    yield create_session_factory(engine)
    engine.dispose()


def new_job(sessions: sessionmaker[Session], status: JobStatus = JobStatus.QUEUED) -> str:
    with session_scope(sessions) as session:
        tenant = Tenant(name=f"t-{uuid.uuid4().hex[:8]}")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, kind=JobKind.FINETUNE, status=status)
        session.add(job)
        session.flush()
        return job.id


def race(sessions: sessionmaker[Session], job_id: str, targets: list[JobStatus]) -> list[bool]:
    """Each thread tries its transition at the same moment, in its own transaction."""
    barrier = threading.Barrier(len(targets))
    results: list[bool] = [False] * len(targets)

    def attempt(i: int) -> None:
        with session_scope(sessions) as session:
            barrier.wait()
            results[i] = jobs.transition(session, job_id, targets[i])

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def test_migrations_match_the_models_on_postgres(pg_url: str) -> None:
    migrate(pg_url)  # idempotent
    engine = create_db_engine(pg_url)
    try:
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == set(Base.metadata.tables) | {
                "alembic_version"
            }
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


@pytest.mark.parametrize("round_", range(3))
def test_two_workers_start_a_job_exactly_once(sessions: sessionmaker[Session], round_: int) -> None:
    job_id = new_job(sessions)
    results = race(sessions, job_id, [JobStatus.RUNNING, JobStatus.RUNNING])
    assert sorted(results) == [False, True]
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert (job.status, job.attempts) == (JobStatus.RUNNING, 1)


def test_cancel_and_finish_race_has_one_winner(sessions: sessionmaker[Session]) -> None:
    job_id = new_job(sessions)
    with session_scope(sessions) as session:
        assert jobs.transition(session, job_id, JobStatus.RUNNING)
    results = race(sessions, job_id, [JobStatus.SUCCEEDED, JobStatus.CANCELED])
    assert sum(results) == 1
    winner = JobStatus.SUCCEEDED if results[0] else JobStatus.CANCELED
    with sessions() as session:
        assert jobs.get_status(session, job_id) is winner


def test_readyz_sees_the_real_redis_and_postgres(pg_url: str) -> None:
    settings = Settings(
        database_url=pg_url,
        redis_url=REDIS,
        triton_url="127.0.0.1:1",  # no Triton here: readiness must still name it alone
        readiness_timeout_s=2.0,
        required_queues=(),  # workers: tests/integration/test_workers.py
    )
    with TestClient(create_app(settings)) as client:
        r = client.get("/readyz")
    assert r.status_code == 503, r.text
    details = r.json()["error"]["details"]
    assert details["checks"]["redis"] is True
    assert details["checks"]["database"] is True
    assert details["down"] == ["triton"]
