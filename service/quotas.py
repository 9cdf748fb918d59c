"""Per-tenant quotas: stored avatars and active (queued or running) jobs.

Over one is 429 `quota_exceeded` with details {quota, limit, used}. Call the checks in the
transaction that inserts the row: on PostgreSQL they lock the tenant's row first, so that
concurrent requests of one tenant take turns and cannot overshoot (SQLite, which serializes
writers anyway, may overshoot by the requests racing at that moment).
"""

from __future__ import annotations

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import ApiError
from service.models import Avatar, Job, JobStatus, Tenant

ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)


def check_avatar_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    """429 `quota_exceeded` if the tenant already has `max_avatars_per_tenant` avatars."""
    _lock_tenant(session, tenant_id)
    used = _count(session, select(func.count(Avatar.id)).where(Avatar.tenant_id == tenant_id))
    limit = settings.max_avatars_per_tenant
    if used >= limit:
        raise _exceeded("avatars", limit, used, f"at most {limit} avatars; delete one first")


def check_job_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    """429 `quota_exceeded` (with Retry-After) if the tenant already has
    `max_active_jobs_per_tenant` queued or running jobs."""
    _lock_tenant(session, tenant_id)
    stmt = select(func.count(Job.id)).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE))
    used = _count(session, stmt)
    limit = settings.max_active_jobs_per_tenant
    if used >= limit:
        message = f"at most {limit} queued or running jobs; wait for one to finish"
        retry_after = {"Retry-After": str(settings.quota_retry_after_s)}
        raise _exceeded("active_jobs", limit, used, message, retry_after)


def _lock_tenant(session: Session, tenant_id: str) -> None:
    # FOR UPDATE on PostgreSQL (held until the caller's commit); SQLite renders no lock.
    session.execute(select(Tenant.id).where(Tenant.id == tenant_id).with_for_update())


def _count(session: Session, stmt: Select[int]) -> int:
    return int(session.scalar(stmt) or 0)


def _exceeded(
    quota: str, limit: int, used: int, message: str, headers: dict[str, str] | None = None
) -> ApiError:
    details = {"quota": quota, "limit": limit, "used": used}
    return ApiError(429, "quota_exceeded", message, details, headers)
