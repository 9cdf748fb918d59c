"""Pose tracks: a driver video in, a job out that stores the video's per-frame pose
descriptors (the paper's identity-free latent pose, Sec. 3), crop boxes and audio as a
reusable resource; then list, get, download the descriptors, delete.

A ready track drives any number of reenactments (`pose_track_id` on `POST /v1/reenactments`
and `/batch`) and pose-space renders without decoding or pose-encoding the video again.
Tenant-scoped like avatars: other tenants' tracks are 404.
"""

from __future__ import annotations

import logging
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse, RedirectResponse
from pydantic import ValidationError
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from media.video import VideoInfo
from service.api.deps import (
    PrincipalDep,
    QueueDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
)
from service.api.paging import CursorQuery, LimitQuery, fetch_page
from service.api.routes.reenactments import check_driver
from service.auth import Principal
from service.config import Settings
from service.db import session_scope
from service.errors import (
    ApiError,
    error_example,
    error_examples,
    unavailable,
    validation_details,
)
from service.idempotency import ACCEPTED, IdempotencyKeyDep, IdempotentRequest
from service.jobs import TERMINAL, transition
from service.models import (
    Job,
    JobKind,
    JobStatus,
    PoseTrack,
    PoseTrackStatus,
    new_id,
    utcnow,
)
from service.pose_tracks import (
    DESCRIPTORS,
    VIDEO,
    effective_status,
    get_track_or_404,
    is_expired,
    jobs_using,
    require_ready,
    track_dir,
)
from service.queue import REENACT_TASK
from service.quotas import check_job_quota
from service.schemas import (
    VIDEO_FIELD,
    JobOut,
    Page,
    PoseTrackCreated,
    PoseTrackOptions,
    PoseTrackOut,
)
from service.storage import ArtifactStore
from service.uploads import FileField, receive_form
from service.webhooks import require_callback_url

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/pose-tracks", tags=["pose tracks"])

NOT_FOUND: Final = error_example("not_found", "no such pose track", {"pose_track_id": "..."})


def _form_schema() -> dict[str, Any]:
    """The multipart body for OpenAPI (parsed by service.uploads, not by FastAPI)."""
    options = PoseTrackOptions.model_json_schema()
    video = {"type": "string", "format": "binary", "description": "The driver video."}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [VIDEO_FIELD],
                        "properties": {VIDEO_FIELD: video, **options["properties"]},
                    }
                }
            },
        }
    }


# --- helpers ---------------------------------------------------------------------------------


def _options(fields: dict[str, str]) -> PoseTrackOptions:
    try:
        return PoseTrackOptions.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "the request is not valid", validation_details(exc.errors())
        ) from None


def _check_track_quota(session: Session, tenant_id: str, settings: Settings) -> None:
    """429 `quota_exceeded` at `max_pose_tracks_per_tenant` tracks (after check_job_quota,
    whose tenant-row lock serializes concurrent creations)."""
    used = int(
        session.scalar(select(func.count(PoseTrack.id)).where(PoseTrack.tenant_id == tenant_id))
        or 0
    )
    limit = settings.max_pose_tracks_per_tenant
    if used >= limit:
        raise ApiError(
            429,
            "quota_exceeded",
            f"at most {limit} pose tracks; delete one first",
            {"quota": "pose_tracks", "limit": limit, "used": used},
        )


def _check_quotas(sessions: sessionmaker[Session], tenant_id: str, settings: Settings) -> None:
    with session_scope(sessions) as session:
        check_job_quota(session, tenant_id, settings)
        _check_track_quota(session, tenant_id, settings)


def _store_video(staging: Path, folder: Path, video: Path, settings: Settings) -> VideoInfo:
    """Check the driver like a reenactment's, give it its stored name, publish the folder."""
    info = check_driver(video, settings)
    video.rename(staging / VIDEO)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(folder)
    return info


def _create(
    sessions: sessionmaker[Session],
    principal: Principal,
    track_id: str,
    options: PoseTrackOptions,
    info: VideoInfo,
    settings: Settings,
) -> tuple[PoseTrack, Job]:
    driver = {
        "frames": info.num_frames,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "audio": info.has_audio,
    }
    with session_scope(sessions) as session:
        check_job_quota(session, principal.tenant_id, settings)
        _check_track_quota(session, principal.tenant_id, settings)
        job_id = new_id()
        now = utcnow()
        track = PoseTrack(
            id=track_id,
            tenant_id=principal.tenant_id,
            name=options.name,
            status=PoseTrackStatus.PENDING,
            job_id=job_id,
            fps=info.fps,
            width=info.width,
            height=info.height,
            audio=False,  # set by the job once the audio is stored
            keep_video=options.keep_video,
            expires_at=now + timedelta(seconds=settings.pose_track_ttl_s),
            created_at=now,
            updated_at=now,
        )
        job = Job(
            id=job_id,
            tenant_id=principal.tenant_id,
            kind=JobKind.POSE_TRACK,
            pose_track_id=track_id,
            stage="queued",
            callback_url=options.callback_url,
            params={"pose_track_id": track_id, "video": VIDEO, "driver": driver},
        )
        session.add(track)
        session.flush()  # the job's foreign key needs the track row
        session.add(job)
    return track, job


def _forget(sessions: sessionmaker[Session], track_id: str, job_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(delete(Job).where(Job.id == job_id))
        session.execute(delete(PoseTrack).where(PoseTrack.id == track_id))


def _remove_files(store: ArtifactStore, tenant_id: str, track_id: str) -> None:
    folder = track_dir(store, tenant_id, track_id)
    shutil.rmtree(folder, ignore_errors=True)
    store.drop_dir(folder)


def _statuses(session: Session, tracks: list[PoseTrack]) -> dict[str, PoseTrackStatus]:
    """Effective statuses; pending tracks look at their job (one query for the page)."""
    pending = {t.job_id: t for t in tracks if t.status is PoseTrackStatus.PENDING and t.job_id}
    ended: set[str] = set()
    if pending:
        rows = session.execute(select(Job.id, Job.status).where(Job.id.in_(list(pending))))
        found: dict[str, JobStatus] = {row.id: row.status for row in rows}
        ended = {
            job_id
            for job_id in pending
            if found.get(job_id) is None
            or (found[job_id] in TERMINAL and found[job_id] is not JobStatus.SUCCEEDED)
        }
    out = {}
    for t in tracks:
        if is_expired(t):
            out[t.id] = PoseTrackStatus.EXPIRED
        elif t.job_id in ended and t.status is PoseTrackStatus.PENDING:
            out[t.id] = PoseTrackStatus.FAILED
        else:
            out[t.id] = t.status
    return out


def _out(session: Session, track: PoseTrack) -> PoseTrackOut:
    status = PoseTrackStatus.EXPIRED if is_expired(track) else effective_status(session, track)
    return PoseTrackOut.of(track, status)


# --- routes ----------------------------------------------------------------------------------


@router.post(
    "",
    status_code=ACCEPTED,
    response_model=PoseTrackCreated,
    summary="Store a driver video's pose descriptors",
    openapi_extra=_form_schema(),
    responses={
        413: error_example(
            "video_too_long",
            "the video may have at most 300 seconds, it has 412.5",
            {"limit": 300.0, "value": 412.5},
        ),
        415: error_example("unsupported_media_type", "send the request as multipart/form-data"),
        422: error_examples(
            ApiError(422, "no_video", "send the driver video as `video`"),
            ApiError(422, "truncated_video", "the video cannot be decoded, or it is cut short"),
        ),
        429: error_example(
            "quota_exceeded",
            "at most 100 pose tracks; delete one first",
            {"quota": "pose_tracks", "limit": 100, "used": 100},
        ),
        503: error_example("queue_unavailable", "the job queue is unavailable"),
    },
)
async def create_pose_track(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    sessions: SessionsDep,
    idempotency_key: IdempotencyKeyDep,
) -> PoseTrackCreated | Response:
    """Upload a driver video; its job (`pose_track`, on the reenact queue) detects the face
    in every frame, encodes each crop to a pose descriptor and stores them with the frame
    times, crop boxes and audio. Poll `GET /v1/jobs/{job.id}`; the track is `ready` when it
    succeeds. Same upload limits as a reenactment; 429 at `max_pose_tracks_per_tenant`
    tracks or `max_active_jobs_per_tenant` jobs. Idempotency-Key supported."""
    tenant_id, track_id = principal.tenant_id, new_id()
    if idempotency_key is None:
        await run_in_threadpool(_check_quotas, sessions, tenant_id, settings)
    folder = track_dir(store, tenant_id, track_id)
    staging = folder.with_name(f".{folder.name}.partial")
    files = [FileField(VIDEO_FIELD, 1, settings.max_video_bytes, "video_too_large", "video")]
    idempotent = IdempotentRequest(sessions, tenant_id, idempotency_key, settings)
    try:
        form = await receive_form(request, staging, files)
        options = _options(form.fields)
        video = form.file(VIDEO_FIELD)
        if video is None:
            raise ApiError(422, "no_video", f"send the driver video as `{VIDEO_FIELD}`")
        if options.callback_url is not None:
            await run_in_threadpool(require_callback_url, options.callback_url, settings)
        replay = await idempotent.replay(
            request, form.fields, form.files, lambda body: f"/v1/jobs/{body['job']['id']}"
        )
        if replay is not None:
            return replay
        info = await run_in_threadpool(_store_video, staging, folder, video, settings)
        await run_in_threadpool(store.push, folder)  # before a worker looks for it
        track, job = await run_in_threadpool(
            _create, sessions, principal, track_id, options, info, settings
        )
        try:
            await run_in_threadpool(queue.enqueue, REENACT_TASK, job.id)
        except Exception as exc:  # kombu's OperationalError, redis errors: nothing was queued
            logger.warning("enqueue of job %s failed: %s", job.id, exc)
            await run_in_threadpool(_forget, sessions, track_id, job.id)
            raise unavailable(
                "queue_unavailable", "the job queue is unavailable", settings.retry_after_s
            ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # no row refers to this upload
        await idempotent.failed()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    created = PoseTrackCreated(pose_track=PoseTrackOut.of(track), job=JobOut.of(job))
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


@router.get("", summary="List pose tracks, newest first")
def list_pose_tracks(
    principal: PrincipalDep,
    session: SessionDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> Page[PoseTrackOut]:
    """The caller's pose tracks; `next_cursor` fetches the next page."""
    stmt = select(PoseTrack).where(PoseTrack.tenant_id == principal.tenant_id)
    tracks, next_cursor = fetch_page(
        session, stmt, PoseTrack.created_at, PoseTrack.id, limit, cursor
    )
    statuses = _statuses(session, tracks)
    items = [PoseTrackOut.of(t, statuses[t.id]) for t in tracks]
    return Page[PoseTrackOut](items=items, next_cursor=next_cursor)


@router.get("/{track_id}", summary="One pose track", responses={404: NOT_FOUND})
def get_pose_track(track_id: str, principal: PrincipalDep, session: SessionDep) -> PoseTrackOut:
    """Status, frames, fps, duration, descriptor size, audio and whether the video is kept."""
    return _out(session, get_track_or_404(session, principal, track_id))


@router.get(
    "/{track_id}/descriptors",
    summary="Download the descriptors (NumPy .npz)",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}},
        307: {"description": "With storage=s3: `Location` is a presigned URL of the file."},
        404: NOT_FOUND,
        409: error_example(
            "pose_track_not_ready",
            "the pose track is pending; wait until it is ready",
            {"status": "pending"},
        ),
        410: error_example(
            "pose_track_expired", "the pose track was deleted after its retention period"
        ),
    },
)
def download_descriptors(
    track_id: str, principal: PrincipalDep, session: SessionDep, store: StoreDep
) -> Response:
    """`poses` float32 (T, D), `times` (T,) seconds, `boxes` (T, 4) crop boxes in driver
    pixels and `faces` (T,) detection flags: `numpy.load(f)["poses"]`. Edited descriptors go
    back in through `POST /v1/avatars/{id}/render`."""
    track = get_track_or_404(session, principal, track_id)
    require_ready(session, track)
    path = track_dir(store, track.tenant_id, track.id) / DESCRIPTORS
    filename = f"pose-track-{track.id}.npz"
    url = store.download_url(path, filename, "application/octet-stream")
    if url is not None:
        return RedirectResponse(url, status_code=307)
    if not path.is_file():
        raise ApiError(
            410, "pose_track_expired", "the pose track was deleted after its retention period"
        )
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.delete(
    "/{track_id}",
    status_code=204,
    summary="Delete a pose track and its files",
    responses={
        404: NOT_FOUND,
        409: error_example(
            "pose_track_in_use",
            "2 unfinished jobs are driven by this pose track; cancel them or wait",
            {"jobs": ["..."]},
        ),
    },
)
def delete_pose_track(
    track_id: str, principal: PrincipalDep, session: SessionDep, store: StoreDep
) -> Response:
    """Delete the track and its files (descriptors, audio, driver video).

    Refused with 409 `pose_track_in_use` while a queued or running reenactment is driven by
    it (their results would be lost half-way; cancel them or wait). Its own encoding job, if
    unfinished, is canceled. Finished jobs it drove keep their results.
    """
    track = get_track_or_404(session, principal, track_id)
    users = jobs_using(session, track.id)
    if users:
        raise ApiError(
            409,
            "pose_track_in_use",
            f"{len(users)} unfinished jobs are driven by this pose track; cancel them or wait",
            {"jobs": users},
        )
    if track.job_id is not None:
        job = session.get(Job, track.job_id)
        if job is not None and job.status not in TERMINAL:
            transition(session, job.id, JobStatus.CANCELED, stage="canceled")
    session.delete(track)
    session.commit()  # files go only once the row is gone, so a failed commit loses nothing
    _remove_files(store, principal.tenant_id, track_id)
    return Response(status_code=204)
