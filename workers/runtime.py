"""What every task needs: settings, sessions, the artifact store and queue (one
`WorkerContext` per process), claiming a job, progress that doubles as heartbeat and
cancellation check, typed failures, and the retry policy.

A job's state lives in the database, so a task is idempotent: it returns at once for a
finished job, waits for a job another live worker holds, and takes over one whose worker
stopped writing progress for `job_lease_s` (it died; the broker redelivered the message).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Final

from celery import Celery, Task
from celery.exceptions import SoftTimeLimitExceeded
from kombu.exceptions import OperationalError as BrokerError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import OperationalError as DatabaseError
from sqlalchemy.orm import Session, sessionmaker

from service.blobs import StorageUnavailable
from service.config import Settings, get_settings
from service.db import create_db_engine, create_session_factory, session_scope
from service.jobs import TERMINAL, get_status, reclaim, set_progress, transition
from service.models import Avatar, AvatarStatus, Job, JobStatus, utcnow
from service.queue import CeleryQueue, TaskQueue
from service.storage import ArtifactStore
from service.triton import TritonError

logger = logging.getLogger(__name__)

PREPROCESS_SHARE: Final = 0.1  # of a fine-tune job's progress bar


class JobFailure(Exception):
    """The job cannot succeed as asked: fail it with this code, do not retry the task."""

    def __init__(self, code: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable  # for the client: may the same request work later?


class JobBusy(Exception):
    """Another worker holds the job and is alive (it wrote progress within the lease)."""


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying the task for: the database, broker, bucket or inference server
    blinked. Everything else fails the job."""
    if isinstance(exc, TritonError):
        return exc.retryable
    return isinstance(
        exc,
        DatabaseError | BrokerError | RedisConnectionError | RedisTimeoutError | StorageUnavailable,
    )


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ArtifactStore
    queue: TaskQueue


_contexts: dict[int, WorkerContext] = {}


def default_context(app: Celery) -> WorkerContext:
    """This process's context from `get_settings()`, publishing through `app`; one per PID,
    since a prefork child must not share the parent's database connections."""
    pid = os.getpid()
    if pid not in _contexts:
        settings = get_settings()
        engine = create_db_engine(
            settings.database_url,
            pool_size=settings.db_pool_size,
            max_overflow=settings.db_max_overflow,
        )
        _contexts[pid] = WorkerContext(
            settings=settings,
            sessions=create_session_factory(engine),
            store=ArtifactStore.from_settings(settings),
            queue=CeleryQueue(app),
        )
    return _contexts[pid]


# --- claiming and finishing ------------------------------------------------------------------


@dataclass(frozen=True)
class Claimed:
    """A job this worker now runs, copied out of the session."""

    id: str
    tenant_id: str
    avatar_id: str
    kind: str
    params: dict[str, Any]
    attempts: int


def claim(ctx: WorkerContext, job_id: str, stage: str) -> Claimed | None:
    """Start `job_id` (queued -> running), or take it over if its worker went silent.

    None: nothing to do (no such job, or it is finished). Raises JobBusy if a live worker
    holds it, JobFailure if it has been started too often.
    """
    settings = ctx.settings
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.status in TERMINAL:
            return None
        if job.attempts >= settings.job_max_attempts:
            raise JobFailure(
                "too_many_attempts",
                f"the job was started {job.attempts} times without finishing",
                retryable=True,
            )
        stale_before = utcnow() - timedelta(seconds=settings.job_lease_s)
        started = transition(
            session, job_id, JobStatus.RUNNING, from_=JobStatus.QUEUED, stage=stage
        )
        if not started and reclaim(session, job_id, stale_before):
            logger.warning("job %s: took over from a silent worker", job_id)
            started = True
        if not started:
            if get_status(session, job_id) in TERMINAL:
                return None
            raise JobBusy(job_id)
        session.refresh(job)
        return Claimed(
            id=job.id,
            tenant_id=job.tenant_id,
            avatar_id=str(job.params.get("avatar_id") or ""),  # none for a pose-track job
            kind=job.kind.value,
            params=dict(job.params),
            attempts=job.attempts,
        )


def fail(ctx: WorkerContext, job_id: str, failure: JobFailure) -> None:
    """Record the failure; an avatar with no identity yet can never be used, so it fails too."""
    with session_scope(ctx.sessions) as session:
        applied = transition(
            session,
            job_id,
            JobStatus.FAILED,
            stage="failed",
            error_code=failure.code,
            error_message=failure.message,
            error_retryable=failure.retryable,
        )
        job = session.get(Job, job_id)
        avatar = session.get(Avatar, job.avatar_id) if job and job.avatar_id else None
        if applied and avatar is not None and avatar.identity_embedding is None:
            avatar.status = AvatarStatus.FAILED
    if applied:  # else it was canceled (or deleted) first, and that stands
        logger.info("job %s failed: %s %s", job_id, failure.code, failure.message)


def requeue(ctx: WorkerContext, job_id: str) -> None:
    """Running -> queued before a retry, so the retried task can claim it (best effort: the
    database may be the thing that is down; the lease covers that case)."""
    try:
        with session_scope(ctx.sessions) as session:
            transition(session, job_id, JobStatus.QUEUED, from_=JobStatus.RUNNING, stage="retrying")
    except Exception as exc:
        logger.warning("job %s: could not requeue: %s", job_id, exc)


def discard_if_deleted(ctx: WorkerContext, job: Claimed) -> None:
    """After a cancel: if the avatar itself was deleted, remove files this task re-created."""
    with session_scope(ctx.sessions) as session:
        gone = session.get(Avatar, job.avatar_id) is None
    if gone:
        ctx.store.delete_avatar(job.tenant_id, job.avatar_id)
        ctx.store.drop_dir(ctx.store.avatar_dir(job.tenant_id, job.avatar_id))


# --- progress --------------------------------------------------------------------------------


@dataclass
class Reporter:
    """Throttled progress writes over [start, end] of the job's bar. Each write is also the
    heartbeat that keeps the lease, and tells whether the job was canceled."""

    ctx: WorkerContext
    job_id: str
    start: float = 0.0
    end: float = 1.0
    canceled: bool = False
    clock: Callable[[], float] = time.monotonic
    _last: float = field(default=float("-inf"), repr=False)

    def update(self, fraction: float, stage: str | None = None, *, force: bool = False) -> bool:
        """Record progress (`fraction` of this stage); False once the job is canceled."""
        now = self.clock()
        if self.canceled or (
            not force and now - self._last < self.ctx.settings.progress_interval_s
        ):
            return not self.canceled
        value = self.start + (self.end - self.start) * min(max(fraction, 0.0), 1.0)
        with session_scope(self.ctx.sessions) as session:
            self.canceled = not set_progress(session, self.job_id, value, stage)
        self._last = now
        return not self.canceled


# --- the task wrapper ------------------------------------------------------------------------


def run_task(task: Task, job_id: str, body: Callable[[WorkerContext, str], None]) -> None:
    """Run `body(ctx, job_id)` under the retry policy: typed failures fail the job, transient
    errors retry with exponential backoff (then fail, retryable), a busy job is retried after
    the lease, anything else fails as `internal_error`."""
    ctx = default_context(task.app)
    settings = ctx.settings
    retries = int(task.request.retries or 0)
    try:
        body(ctx, job_id)
    except JobBusy:
        raise task.retry(countdown=settings.job_lease_s) from None
    except JobFailure as failure:
        fail(ctx, job_id, failure)
    except SoftTimeLimitExceeded:
        fail(ctx, job_id, JobFailure("timeout", "the job ran out of time", retryable=True))
    except Exception as exc:
        if not is_transient(exc):
            logger.exception("job %s: unexpected error", job_id)
            fail(ctx, job_id, JobFailure("internal_error", "internal error", retryable=True))
            return
        if retries >= settings.task_max_retries:
            logger.error("job %s: giving up after %d retries: %s", job_id, retries, exc)
            code = exc.code if isinstance(exc, TritonError) else "dependency_unavailable"
            fail(ctx, job_id, JobFailure(code, "a dependency stayed unavailable", retryable=True))
            return
        logger.warning("job %s: transient error, retry %d: %s", job_id, retries + 1, exc)
        requeue(ctx, job_id)
        countdown = settings.task_retry_backoff_s * 2**retries
        raise task.retry(exc=exc, countdown=countdown) from None
