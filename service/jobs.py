"""The job state machine, kept in the database so that tasks and API calls are idempotent.

Every status change is one conditional UPDATE (`... WHERE id = :id AND status IN (sources)`):
of two workers racing to start a job, or a worker finishing a job the user just canceled,
exactly one change applies and the other learns it did not.

    queued  -> running | canceled | failed
    running -> succeeded | failed | canceled | queued (retry)
    succeeded, failed, canceled: final
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import CursorResult, and_, false, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.util import identity_key

from service.models import Job, JobStatus, utcnow
from service.webhooks import record_event

TRANSITIONS: Final[Mapping[JobStatus, frozenset[JobStatus]]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset(
        {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.QUEUED}
    ),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELED: frozenset(),
}
TERMINAL: Final = frozenset(s for s, targets in TRANSITIONS.items() if not targets)

# Columns a transition may set along with the status; id, tenant, kind and status are not here.
_SETTABLE: Final = frozenset(
    {
        "progress",
        "stage",
        "error_code",
        "error_message",
        "error_retryable",
        "result",
        "params",
        "started_at",
        "finished_at",
        "callback_url",
    }
)


class InvalidTransition(ValueError):
    """A status change the state machine never allows (e.g. anything out of `succeeded`)."""

    def __init__(self, source: JobStatus | str, target: JobStatus | str) -> None:
        super().__init__(f"job cannot go from {source} to {target}")
        self.source = JobStatus(source)
        self.target = JobStatus(target)


class JobNotFound(LookupError):
    """No job with this id."""


def can_transition(source: JobStatus | str, target: JobStatus | str) -> bool:
    """Whether `source -> target` is an edge of the state machine."""
    return JobStatus(target) in TRANSITIONS[JobStatus(source)]


def check_transition(source: JobStatus | str, target: JobStatus | str) -> None:
    """Raise `InvalidTransition` unless `source -> target` is allowed."""
    if not can_transition(source, target):
        raise InvalidTransition(source, target)


def sources_of(target: JobStatus | str) -> frozenset[JobStatus]:
    """The statuses from which a job may move to `target`."""
    target = JobStatus(target)
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


def transition(
    session: Session,
    job_id: str,
    to: JobStatus | str,
    *,
    from_: JobStatus | str | Iterable[JobStatus | str] | None = None,
    **fields: Any,
) -> bool:
    """Move job `job_id` to status `to` and set `fields`, atomically; True if it applied.

    False means the job was not in a status that allows `to` (another worker started it, the
    user canceled it, it already finished): re-read it to see why. `from_` narrows the
    accepted sources further (e.g. `running -> queued` only). Entering `running` stamps
    `started_at` and counts an attempt; entering a final status stamps `finished_at`, and
    `succeeded` sets progress to 1; a final status of a job with a `callback_url` also adds
    its webhook delivery row (service.webhooks). The caller commits (see
    `service.db.session_scope`).

    Raises `InvalidTransition` if a `from_` status can never reach `to`, `JobNotFound` if
    there is no such job, and `ValueError` for a field that is not settable.
    """
    target = JobStatus(to)
    allowed = sources_of(target)
    if from_ is not None:
        wanted = {JobStatus(from_)} if isinstance(from_, str) else {JobStatus(s) for s in from_}
        if invalid := wanted - allowed:
            raise InvalidTransition(sorted(invalid)[0], target)
        allowed = frozenset(wanted)
    if unknown := fields.keys() - _SETTABLE:
        raise ValueError(f"cannot set {sorted(unknown)} in a transition")

    now = utcnow()
    values: dict[str, Any] = {"status": target, "updated_at": now}
    if target is JobStatus.RUNNING:
        values["started_at"] = now
        values["attempts"] = Job.attempts + 1
    if target in TERMINAL:
        values["finished_at"] = now
    if target is JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    if "progress" in fields:
        fields["progress"] = _check_progress(fields["progress"])
    values.update(fields)

    applied = _update(session, job_id, values, Job.status.in_(allowed) if allowed else false())
    if not applied and session.scalar(select(Job.id).where(Job.id == job_id)) is None:
        raise JobNotFound(job_id)
    if applied and target in TERMINAL:
        # The webhook outbox row commits (or rolls back) with the status change itself.
        record_event(session, job_id, target)
    return applied


def set_progress(session: Session, job_id: str, progress: float, stage: str | None = None) -> bool:
    """Record a running job's progress (0-1) and stage; False if it is no longer running.

    Workers poll this as their cancellation signal: False means stop.
    """
    values: dict[str, Any] = {"progress": _check_progress(progress), "updated_at": utcnow()}
    if stage is not None:
        values["stage"] = stage
    return _update(session, job_id, values, Job.status == JobStatus.RUNNING)


def reclaim(session: Session, job_id: str, stale_before: datetime) -> bool:
    """Take over a running job whose worker stopped writing (last write before
    `stale_before`): True if this caller now owns it, and an attempt is counted.

    A redelivered task (its worker died) calls this; it is a compare-and-set on the last
    write time, so of two workers reclaiming the same job only one succeeds, and a job whose
    worker is alive (it keeps writing progress) is never taken.
    """
    values: dict[str, Any] = {"updated_at": utcnow(), "attempts": Job.attempts + 1}
    condition = and_(Job.status == JobStatus.RUNNING, Job.updated_at < stale_before)
    return _update(session, job_id, values, condition)


def get_status(session: Session, job_id: str) -> JobStatus:
    """The job's current status as stored (not the session's cached copy)."""
    status = session.scalar(select(Job.status).where(Job.id == job_id))
    if status is None:
        raise JobNotFound(job_id)
    return status


def _check_progress(progress: float) -> float:
    value = float(progress)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"progress must be in [0, 1], got {progress!r}")
    return value


def _update(session: Session, job_id: str, values: dict[str, Any], condition: Any) -> bool:
    stmt = (
        update(Job)
        .where(Job.id == job_id, condition)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    result = cast(CursorResult[Any], session.execute(stmt))
    applied = result.rowcount == 1
    if applied:
        # A Job loaded earlier in this session is now stale; reload it on next access.
        cached = session.identity_map.get(identity_key(Job, job_id))
        if cached is not None:
            session.expire(cached)
    return applied
