"""maintenance.cleanup with real files in tmp_path and a migrated SQLite database."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import session_scope
from service.models import (
    IdempotencyRecord,
    Job,
    JobKind,
    JobStatus,
    Tenant,
    WebhookDelivery,
    new_id,
    utcnow,
)
from service.storage import ArtifactStore
from workers import maintenance
from workers.runtime import WorkerContext

TTL_S = 24 * 3600


class NullQueue:
    def enqueue(self, task: str, job_id: str) -> None:
        raise AssertionError("cleanup publishes nothing")

    def workers_per_queue(self, timeout_s: float) -> dict[str, int]:
        return {}


@pytest.fixture
def ctx(db_url: str, tmp_path: Path, sessions: sessionmaker[Session]) -> WorkerContext:
    settings = Settings(
        database_url=db_url, artifacts_dir=tmp_path / "artifacts", job_result_ttl_s=TTL_S
    )
    return WorkerContext(settings, sessions, ArtifactStore(settings.artifacts_dir), NullQueue())


@pytest.fixture
def tenant_id(sessions: sessionmaker[Session]) -> str:
    with session_scope(sessions) as session:
        tenant = Tenant(name="acme")
        session.add(tenant)
        session.flush()
        return tenant.id


def add_job(
    ctx: WorkerContext,
    tenant_id: str,
    status: JobStatus,
    finished_at: datetime | None,
    kind: JobKind = JobKind.REENACT,
    result: dict[str, Any] | None = None,
) -> str:
    """A job row and a result file in its job directory."""
    with session_scope(ctx.sessions) as session:
        job = Job(
            tenant_id=tenant_id,
            kind=kind,
            status=status,
            params={},
            result=result,
            finished_at=finished_at,
        )
        session.add(job)
        session.flush()
        job_id = job.id
    folder = ctx.store.job_dir(tenant_id, job_id)
    folder.mkdir(parents=True)
    (folder / "result.mp4").write_bytes(b"video")
    return job_id


def load(ctx: WorkerContext, job_id: str) -> Job:
    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_old_results_are_deleted_and_marked_expired(ctx: WorkerContext, tenant_id: str) -> None:
    now = utcnow()
    old, recent = now - timedelta(seconds=TTL_S + 60), now - timedelta(seconds=TTL_S - 60)
    S = JobStatus
    info = {"files": {"video": "result.mp4"}, "frames": 10}
    expired = add_job(ctx, tenant_id, S.SUCCEEDED, old, result=info)
    failed = add_job(ctx, tenant_id, S.FAILED, old)
    kept = add_job(ctx, tenant_id, S.SUCCEEDED, recent, result=info)
    running = add_job(ctx, tenant_id, S.RUNNING, None)
    avatar_job = add_job(ctx, tenant_id, S.SUCCEEDED, old, kind=JobKind.FINETUNE)

    report = maintenance.cleanup(ctx, now=now)
    assert report.expired_jobs == 2
    for job_id in (expired, failed):
        assert not ctx.store.job_dir(tenant_id, job_id).exists()
    assert load(ctx, expired).result == {**info, "expired": True}  # the row stays
    assert load(ctx, expired).status is S.SUCCEEDED
    assert load(ctx, failed).result == {"expired": True}
    for job_id in (kept, running, avatar_job):
        assert (ctx.store.job_dir(tenant_id, job_id) / "result.mp4").is_file()
        assert not (load(ctx, job_id).result or {}).get("expired")

    # Idempotent: nothing is left to expire; later, the recent one is.
    assert maintenance.cleanup(ctx, now=now).expired_jobs == 0
    later = maintenance.cleanup(ctx, now=now + timedelta(seconds=120))
    assert later.expired_jobs == 1 and not ctx.store.job_dir(tenant_id, kept).exists()


def test_expiry_goes_in_batches(
    ctx: WorkerContext, tenant_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(maintenance, "BATCH", 2)
    old = utcnow() - timedelta(seconds=TTL_S + 60)
    ids = [add_job(ctx, tenant_id, JobStatus.CANCELED, old) for _ in range(5)]
    assert maintenance.cleanup(ctx).expired_jobs == 5
    assert all(load(ctx, job_id).result == {"expired": True} for job_id in ids)


def age(path: Path, seconds: float) -> None:
    t = utcnow().timestamp() - seconds
    os.utime(path, (t, t))


def test_stale_upload_staging_is_removed(ctx: WorkerContext, tenant_id: str) -> None:
    avatar = ctx.store.avatar_dir(tenant_id, new_id())
    stale = avatar / ".photos.0a1b.partial"
    fresh = avatar / ".photos.2c3d.partial"
    published = avatar / "photos"
    lookalike = avatar / "photos.partial"  # no leading dot: not staging
    stale_file = ctx.store.job_dir(tenant_id, new_id()) / ".video.partial"
    for folder in (stale, fresh, published, lookalike):
        folder.mkdir(parents=True)
        (folder / "0.upload").write_bytes(b"x")
    stale_file.parent.mkdir(parents=True)
    stale_file.write_bytes(b"x")
    for path in (stale, published, lookalike, stale_file):
        age(path, 2 * 3600)

    assert maintenance.cleanup(ctx).removed_uploads == 2
    assert not stale.exists() and not stale_file.exists()
    assert fresh.is_dir() and published.is_dir() and lookalike.is_dir()


def test_old_webhook_rows_are_deleted(ctx: WorkerContext, tenant_id: str) -> None:
    now = utcnow()
    old, recent = now - timedelta(seconds=TTL_S + 60), now - timedelta(seconds=60)
    job_id = add_job(ctx, tenant_id, JobStatus.SUCCEEDED, recent)
    rows = {
        "delivered_old": {"delivered_at": old, "next_attempt_at": None},
        "delivered_recent": {"delivered_at": recent, "next_attempt_at": None},
        "gave_up_old": {"delivered_at": None, "next_attempt_at": None},
        "pending_old": {"delivered_at": None, "next_attempt_at": old},
    }
    with session_scope(ctx.sessions) as session:
        for name, values in rows.items():
            session.add(
                WebhookDelivery(
                    id=new_id(),
                    job_id=job_id,
                    event=name,
                    url="https://example.com/hook",
                    created_at=old if name != "delivered_recent" else recent,
                    **values,
                )
            )

    assert maintenance.cleanup(ctx, now=now).deleted_deliveries == 2
    with ctx.sessions() as session:
        left = set(session.scalars(select(WebhookDelivery.event)))
    assert left == {"delivered_recent", "pending_old"}  # a pending one is still sent


def test_old_idempotency_records_are_purged(ctx: WorkerContext, tenant_id: str) -> None:
    now = utcnow()
    ttl = timedelta(seconds=ctx.settings.idempotency_ttl_s)
    with session_scope(ctx.sessions) as session:
        for key, created in (("old", now - ttl - timedelta(minutes=1)), ("new", now)):
            session.add(
                IdempotencyRecord(
                    tenant_id=tenant_id, key=key, request_sha256="0" * 64, created_at=created
                )
            )
    assert maintenance.cleanup(ctx, now=now).purged_idempotency == 1
    with ctx.sessions() as session:
        assert list(session.scalars(select(IdempotencyRecord.key))) == ["new"]


def test_stalled_queued_jobs_are_published_again_once(
    ctx: WorkerContext, tenant_id: str, sessions: sessionmaker[Session]
) -> None:
    from service.queue import FINETUNE_TASK, PREPROCESS_TASK, REENACT_TASK
    from tests.unit.test_avatars_api import RecordingQueue

    queue = RecordingQueue()
    ctx = WorkerContext(ctx.settings, ctx.sessions, ctx.store, queue)
    now = datetime.now(UTC)
    old, recent = now - timedelta(hours=1), now - timedelta(seconds=30)
    cases = [  # kind, stage, status, last write -> the task published, or None
        (JobKind.REENACT, "queued", JobStatus.QUEUED, old, REENACT_TASK),
        (JobKind.FINETUNE, "finetune_queued", JobStatus.QUEUED, old, FINETUNE_TASK),
        (JobKind.FINETUNE, "queued", JobStatus.QUEUED, old, PREPROCESS_TASK),
        (JobKind.REENACT, "queued", JobStatus.QUEUED, recent, None),  # not stalled yet
        (JobKind.REENACT, "tracking", JobStatus.RUNNING, old, None),  # the lease's business
    ]
    expected = []
    with session_scope(sessions) as session:
        for kind, stage, status, written, task in cases:
            job = Job(tenant_id=tenant_id, kind=kind, status=status, stage=stage, params={})
            session.add(job)
            session.flush()
            session.execute(update(Job).where(Job.id == job.id).values(updated_at=written))
            if task is not None:
                expected.append((task, job.id))
    assert sorted(maintenance.requeue_stalled(ctx, now)) == sorted(j for _, j in expected)
    assert sorted(queue.sent) == sorted(expected)
    assert maintenance.requeue_stalled(ctx, now) == []  # bumped: not again before the delay
