"""Jobs: status and progress of one job, the tenant's jobs (paged), and cancellation.

Other tenants' jobs are 404. Cancelling moves the job to `canceled` at once (the state
machine in service.jobs); a worker still running it sees that at its next progress write and
stops.
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import PrincipalDep, SessionDep, SignerDep
from service.api.paging import CursorQuery, LimitQuery, fetch_page
from service.auth import Principal
from service.errors import ApiError, error_example
from service.jobs import TERMINAL, transition
from service.models import Avatar, AvatarStatus, Job, JobStatus
from service.schemas import JobOut, Page

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

NOT_FOUND: Final = error_example("not_found", "no such job")


def get_job_or_404(session: Session, principal: Principal, job_id: str) -> Job:
    job = session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == principal.tenant_id))
    if job is None:
        raise ApiError(404, "not_found", "no such job")
    return job


@router.get("", summary="List jobs, newest first")
def list_jobs(
    principal: PrincipalDep,
    session: SessionDep,
    signer: SignerDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this status.")] = None,
    avatar_id: Annotated[str | None, Query(description="Only this avatar's jobs.")] = None,
) -> Page[JobOut]:
    """The caller's jobs; `next_cursor` fetches the next page."""
    stmt = select(Job).where(Job.tenant_id == principal.tenant_id)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if avatar_id is not None:
        stmt = stmt.where(Job.avatar_id == avatar_id)
    jobs, next_cursor = fetch_page(session, stmt, Job.created_at, Job.id, limit, cursor)
    return Page[JobOut](items=[JobOut.of(j, signer) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", summary="One job's status and progress", responses={404: NOT_FOUND})
def get_job(job_id: str, principal: PrincipalDep, session: SessionDep, signer: SignerDep) -> JobOut:
    """Status, progress (0-1), stage, timestamps; `result` links when it succeeded, `error`
    {code, message, retryable} when it failed."""
    return JobOut.of(get_job_or_404(session, principal, job_id), signer)


@router.post(
    "/{job_id}/cancel",
    summary="Cancel a queued or running job",
    responses={
        404: NOT_FOUND,
        409: error_example("job_finished", "the job already succeeded", {"status": "succeeded"}),
    },
)
def cancel_job(job_id: str, principal: PrincipalDep, session: SessionDep) -> JobOut:
    """Cancel the job (idempotent for a canceled one; 409 `job_finished` once it succeeded
    or failed). An avatar whose identity was not embedded yet becomes `failed`; one already
    usable zero-shot stays `ready`."""
    job = get_job_or_404(session, principal, job_id)
    if job.status not in TERMINAL:
        transition(session, job.id, JobStatus.CANCELED, stage="canceled")
        session.refresh(job)  # a worker may have finished it just before
    if job.status is not JobStatus.CANCELED:
        raise ApiError(
            409, "job_finished", f"the job already {job.status.value}", {"status": job.status}
        )
    if job.avatar_id is not None:
        avatar = session.get(Avatar, job.avatar_id)
        if avatar is not None and avatar.status is AvatarStatus.PENDING:
            avatar.status = AvatarStatus.FAILED
    return JobOut.of(job)
