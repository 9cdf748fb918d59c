"""Migrations against the models, SQLite settings, and the job state machine (service.jobs)."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service import jobs
from service.db import (
    alembic_config,
    create_db_engine,
    migrate,
    normalize_url,
    session_scope,
)
from service.jobs import InvalidTransition, JobNotFound
from service.models import ApiKey, Base, Job, JobKind, JobStatus, Tenant, utcnow

S = JobStatus


def make_job(sessions: sessionmaker[Session], status: JobStatus = S.QUEUED) -> str:
    with session_scope(sessions) as session:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, kind=JobKind.REENACT, status=status, params={"fps": 25})
        session.add(job)
        session.flush()
        return job.id


def load(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


# --- migrations ------------------------------------------------------------------------------


def test_migrations_create_exactly_the_models_tables(db_url: str) -> None:
    migrate(db_url)  # a second run is a no-op
    engine = create_db_engine(db_url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            diff = compare_metadata(
                MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
            )
        assert tables == set(Base.metadata.tables) | {"alembic_version"}
        assert diff == []  # columns, types, indexes and constraints all match the models
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        with engine.connect() as conn:
            assert set(inspect(conn).get_table_names()) == {"alembic_version"}
    finally:
        engine.dispose()


def test_sqlite_enforces_foreign_keys(sessions: sessionmaker[Session]) -> None:
    with pytest.raises(IntegrityError), session_scope(sessions) as session:
        session.add(ApiKey(tenant_id="missing", prefix="0" * 12, secret_sha256="0" * 64, name="x"))


def test_timestamps_come_back_utc_aware(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    job = load(sessions, job_id)
    assert job.created_at.tzinfo is not None
    assert job.created_at.utcoffset() == UTC.utcoffset(None)
    assert abs((datetime.now(UTC) - job.created_at).total_seconds()) < 60
    assert job.params == {"fps": 25}


def test_plain_postgresql_urls_use_psycopg3() -> None:
    url = normalize_url("postgresql://postgres@127.0.0.1:5432/test")
    assert url.drivername == "postgresql+psycopg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite"


# --- state machine ---------------------------------------------------------------------------

ALLOWED = {
    (S.QUEUED, S.RUNNING),
    (S.QUEUED, S.CANCELED),
    (S.QUEUED, S.FAILED),
    (S.RUNNING, S.SUCCEEDED),
    (S.RUNNING, S.FAILED),
    (S.RUNNING, S.CANCELED),
    (S.RUNNING, S.QUEUED),
}


@pytest.mark.parametrize("source", list(S))
@pytest.mark.parametrize("target", list(S))
def test_transition_table(source: JobStatus, target: JobStatus) -> None:
    assert jobs.can_transition(source, target) == ((source, target) in ALLOWED)
    if (source, target) not in ALLOWED:
        with pytest.raises(InvalidTransition):
            jobs.check_transition(source, target)


def test_terminal_states_are_final() -> None:
    assert frozenset({S.SUCCEEDED, S.FAILED, S.CANCELED}) == jobs.TERMINAL


def test_start_applies_once(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert jobs.transition(session, job_id, S.RUNNING, stage="decode")
    with session_scope(sessions) as session:
        assert not jobs.transition(session, job_id, S.RUNNING)  # already running: not applied
    job = load(sessions, job_id)
    assert job.status is S.RUNNING
    assert job.stage == "decode"
    assert job.attempts == 1
    assert job.started_at is not None
    assert job.finished_at is None


def test_success_stamps_finish_and_is_final(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert jobs.transition(session, job_id, S.RUNNING)
        assert jobs.transition(session, job_id, S.SUCCEEDED, result={"video": "out.mp4"})
    job = load(sessions, job_id)
    assert (job.status, job.progress, job.result) == (S.SUCCEEDED, 1.0, {"video": "out.mp4"})
    assert job.finished_at is not None
    with session_scope(sessions) as session:
        for target in S:
            assert not jobs.transition(session, job_id, target)
    assert load(sessions, job_id).status is S.SUCCEEDED


def test_failure_records_the_error(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert jobs.transition(
            session,
            job_id,
            S.FAILED,
            error_code="no_face",
            error_message="no face in the driving video",
            error_retryable=False,
        )
    job = load(sessions, job_id)
    assert (job.status, job.error_code, job.error_retryable) == (S.FAILED, "no_face", False)


def test_retry_requeues_and_counts_attempts(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert jobs.transition(session, job_id, S.RUNNING)
        assert jobs.transition(session, job_id, S.QUEUED, from_=S.RUNNING)
        assert jobs.transition(session, job_id, S.RUNNING)
    assert load(sessions, job_id).attempts == 2


def test_from_narrows_the_sources(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        # queued -> canceled is allowed, but the caller only wants to cancel a running job
        assert not jobs.transition(session, job_id, S.CANCELED, from_=[S.RUNNING])
        with pytest.raises(InvalidTransition):
            jobs.transition(session, job_id, S.RUNNING, from_=S.SUCCEEDED)
    assert load(sessions, job_id).status is S.QUEUED


def test_bad_calls_raise(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        with pytest.raises(JobNotFound):
            jobs.transition(session, "no-such-job", S.RUNNING)
        with pytest.raises(ValueError, match="cannot set"):
            jobs.transition(session, job_id, S.RUNNING, tenant_id="other")
        with pytest.raises(ValueError, match="progress"):
            jobs.transition(session, job_id, S.RUNNING, progress=1.5)
        with pytest.raises(ValueError, match="paused"):
            jobs.transition(session, job_id, "paused")


def test_transition_refreshes_a_loaded_job(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        assert job.status is S.QUEUED
        assert jobs.transition(session, job_id, S.RUNNING)
        assert job.status is S.RUNNING
        assert jobs.get_status(session, job_id) is S.RUNNING


def test_progress_only_while_running(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert not jobs.set_progress(session, job_id, 0.1)  # still queued
        assert jobs.transition(session, job_id, S.RUNNING)
        assert jobs.set_progress(session, job_id, 0.5, stage="render")
        with pytest.raises(ValueError, match="progress"):
            jobs.set_progress(session, job_id, float("nan"))
    job = load(sessions, job_id)
    assert (job.progress, job.stage) == (0.5, "render")
    with session_scope(sessions) as session:
        assert jobs.transition(session, job_id, S.CANCELED)
        assert not jobs.set_progress(session, job_id, 0.6)  # the worker's signal to stop
    assert load(sessions, job_id).progress == 0.5


def test_reclaim_takes_only_a_silent_running_job(sessions: sessionmaker[Session]) -> None:
    lease = timedelta(seconds=0.05)
    job_id = make_job(sessions)
    with session_scope(sessions) as session:
        assert not jobs.reclaim(session, job_id, utcnow())  # queued: start it, don't reclaim
        assert jobs.transition(session, job_id, S.RUNNING)
    with session_scope(sessions) as session:
        assert not jobs.reclaim(session, job_id, utcnow() - lease)  # its worker is alive
    time.sleep(0.1)  # ... and then silent for longer than the lease
    with session_scope(sessions) as session:
        assert jobs.reclaim(session, job_id, utcnow() - lease)
    # The takeover is a write: a second reclaimer right after finds the job alive.
    with session_scope(sessions) as session:
        assert not jobs.reclaim(session, job_id, utcnow() - lease)
    job = load(sessions, job_id)
    assert (job.status, job.attempts) == (S.RUNNING, 2)


def test_concurrent_starts_on_sqlite(sessions: sessionmaker[Session]) -> None:
    job_id = make_job(sessions)
    n = 6
    barrier = threading.Barrier(n)
    won: list[bool] = []

    def start() -> None:
        barrier.wait()
        with session_scope(sessions) as session:
            won.append(jobs.transition(session, job_id, S.RUNNING))

    threads = [threading.Thread(target=start) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(won) == [False] * (n - 1) + [True]
    assert load(sessions, job_id).attempts == 1
