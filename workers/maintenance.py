"""Periodic upkeep, run by beat as `maintenance.cleanup`: delete reenactment and render
results past `job_result_ttl_s` (the job row stays, marked expired), pose tracks' files past
their `expires_at` (the row stays, `expired`), abandoned upload staging, old webhook rows and
idempotency records. Every step is idempotent: the next run finishes an interrupted one.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Final, cast

from sqlalchemy import CursorResult, and_, delete, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.db import session_scope
from service.idempotency import purge_idempotency
from service.jobs import TERMINAL
from service.models import (
    RESULT_KINDS,
    Job,
    JobKind,
    JobStatus,
    PoseTrack,
    PoseTrackStatus,
    WebhookDelivery,
    utcnow,
)
from service.pose_tracks import track_dir
from service.queue import FINETUNE_TASK, PREPROCESS_TASK, REENACT_TASK
from service.storage import ArtifactStore
from workers.runtime import WorkerContext

logger = logging.getLogger(__name__)

STALE_UPLOAD_S: Final = 3600.0  # no upload takes this long to stage
BATCH: Final = 200


@dataclass(frozen=True)
class CleanupReport:
    expired_jobs: int
    expired_pose_tracks: int
    removed_uploads: int
    deleted_deliveries: int
    purged_idempotency: int


def cleanup(ctx: WorkerContext, now: datetime | None = None) -> CleanupReport:
    """One pass of every upkeep step, as of `now`."""
    settings = ctx.settings
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.job_result_ttl_s)
    report = CleanupReport(
        expired_jobs=expire_results(ctx.sessions, ctx.store, cutoff),
        expired_pose_tracks=expire_pose_tracks(ctx.sessions, ctx.store, now),
        removed_uploads=remove_stale_uploads(ctx.store.root, now.timestamp() - STALE_UPLOAD_S),
        deleted_deliveries=_in_session(ctx.sessions, delete_old_deliveries, cutoff),
        purged_idempotency=_in_session(
            ctx.sessions,
            purge_idempotency,
            now - timedelta(seconds=settings.idempotency_ttl_s),
        ),
    )
    logger.info("cleanup: %s", report)
    return report


def expire_results(sessions: sessionmaker[Session], store: ArtifactStore, before: datetime) -> int:
    """Delete the files of reenactment and render jobs that finished before `before` (here
    and in the bucket), then set their `result["expired"]`; files go first, so a crash in
    between is redone, never leaked.

    Preprocess and fine-tune jobs are left alone: their results are the avatar's files,
    which live as long as the avatar.
    """
    not_expired = Job.result["expired"].as_boolean().is_not(True)
    done: set[str] = set()
    while True:
        with session_scope(sessions) as session:
            rows = session.execute(
                select(Job.id, Job.tenant_id)
                .where(
                    Job.kind.in_(RESULT_KINDS),
                    Job.status.in_(TERMINAL),
                    Job.finished_at < before,
                    not_expired,
                )
                .order_by(Job.finished_at, Job.id)
                .limit(BATCH)
            ).all()
        batch = [(job_id, tenant_id) for job_id, tenant_id in rows if job_id not in done]
        if not batch:
            return len(done)
        for job_id, tenant_id in batch:
            store.drop_dir(store.job_dir(tenant_id, job_id))
            store.delete_job(tenant_id, job_id)
        with session_scope(sessions) as session:
            for job_id, _ in batch:
                job = session.get(Job, job_id)
                if job is not None:
                    job.result = {**(job.result or {}), "expired": True}
        done.update(job_id for job_id, _ in batch)


def expire_pose_tracks(sessions: sessionmaker[Session], store: ArtifactStore, now: datetime) -> int:
    """Delete the files of pose tracks whose `expires_at` passed (here and in the bucket),
    then mark them `expired`. A track still driving an unfinished job waits for the next
    run: its job reads the files."""
    busy = (
        select(Job.id)
        .where(Job.pose_track_id == PoseTrack.id, Job.status.not_in(TERMINAL))
        .exists()
    )
    done: set[str] = set()
    while True:
        with session_scope(sessions) as session:
            rows = session.execute(
                select(PoseTrack.id, PoseTrack.tenant_id)
                .where(
                    PoseTrack.status != PoseTrackStatus.EXPIRED,
                    PoseTrack.expires_at < now,
                    ~busy,
                )
                .order_by(PoseTrack.expires_at, PoseTrack.id)
                .limit(BATCH)
            ).all()
        batch = [(track_id, tenant_id) for track_id, tenant_id in rows if track_id not in done]
        if not batch:
            return len(done)
        for track_id, tenant_id in batch:
            folder = track_dir(store, tenant_id, track_id)
            store.drop_dir(folder)
            shutil.rmtree(folder, ignore_errors=True)
        with session_scope(sessions) as session:
            for track_id, _ in batch:
                track = session.get(PoseTrack, track_id)
                if track is not None:
                    track.status = PoseTrackStatus.EXPIRED
        done.update(track_id for track_id, _ in batch)


def remove_stale_uploads(root: Path, before_ts: float) -> int:
    """Remove upload staging (`.<name>.partial`, a directory or a file) anywhere under `root`
    last modified before `before_ts`: what a crashed or killed API process left behind."""
    removed = 0
    for folder, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            if not (name.startswith(".") and name.endswith(".partial")):
                continue
            path = Path(folder) / name
            if name in dirnames:
                dirnames.remove(name)  # never descend into staging
            try:
                stat = path.lstat()
                if stat.st_mtime >= before_ts:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
            except FileNotFoundError:
                pass  # the API published or removed it meanwhile
            except OSError as exc:
                logger.warning("cleanup: cannot remove %s: %s", path, exc)
    return removed


def delete_old_deliveries(session: Session, before: datetime) -> int:
    """Delete webhook rows delivered before `before`, and given-up ones created before it."""
    gave_up = and_(
        WebhookDelivery.delivered_at.is_(None),
        WebhookDelivery.next_attempt_at.is_(None),
        WebhookDelivery.created_at < before,
    )
    result = session.execute(
        delete(WebhookDelivery)
        .where(or_(WebhookDelivery.delivered_at < before, gave_up))
        .execution_options(synchronize_session=False)
    )
    return int(cast(CursorResult[Any], result).rowcount)


def _in_session(
    sessions: sessionmaker[Session], step: Callable[[Session, datetime], int], before: datetime
) -> int:
    with session_scope(sessions) as session:
        return step(session, before)


def requeue_stalled(ctx: WorkerContext, now: datetime | None = None) -> list[str]:
    """Publish again the jobs queued for `job_stalled_after_s` that no worker took: their
    message was lost (a Redis restart without persistence, a failed hand-off). Tasks are
    idempotent, so a duplicate is harmless; each job is bumped first (a compare-and-set on
    `updated_at`), so two beats don't both publish it. Returns the job ids published."""
    now = now or utcnow()
    before = now - timedelta(seconds=ctx.settings.job_stalled_after_s)
    published = []
    with session_scope(ctx.sessions) as session:
        stalled = session.execute(
            select(Job.id, Job.kind, Job.stage)
            .where(Job.status == JobStatus.QUEUED, Job.updated_at < before)
            .limit(BATCH)
        ).all()
    for job_id, kind, stage in stalled:
        with session_scope(ctx.sessions) as session:
            bumped = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.updated_at < before)
                .values(updated_at=now)
                .execution_options(synchronize_session=False)
            )
        if getattr(bumped, "rowcount", 0) != 1:
            continue
        ctx.queue.enqueue(_task_of(kind, stage), job_id)
        published.append(job_id)
    if published:
        logger.warning("requeued %d stalled jobs: %s", len(published), published)
    return published


def _task_of(kind: JobKind, stage: str | None) -> str:
    if kind in (JobKind.REENACT, JobKind.POSE_TRACK, JobKind.RENDER):  # the reenact queue
        return REENACT_TASK
    if kind is JobKind.FINETUNE and stage == "finetune_queued":  # preprocess is done
        return FINETUNE_TASK
    return PREPROCESS_TASK
