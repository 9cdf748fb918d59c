"""Reenactments: a driver video or a stored pose track (and options) in, a job out; the
reenact worker renders the avatar with the driver's pose through Triton and stores the result.

The video is streamed to disk under `max_video_bytes`, then checked by demuxing it with PyAV
(truncated, not a video, too long, too large, too fast) before anything is queued. A pose
track (`pose_track_id`, multipart or JSON) skips all of that: the descriptors are stored, so
only the generator runs. `POST /v1/reenactments/batch` drives several avatars with one track.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from media.errors import MediaError
from media.video import VideoInfo, check_video
from service.api.body import inline_schema, is_json, parse, read_json
from service.api.deps import (
    PrincipalDep,
    QueueDep,
    SessionsDep,
    SettingsDep,
    SignerDep,
    StoreDep,
)
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
from service.models import Avatar, Job, JobKind, PoseTrack, new_id
from service.pose_tracks import require_usable
from service.queue import REENACT_TASK, TaskQueue
from service.quotas import ACTIVE, check_job_quota
from service.schemas import (
    BACKGROUND_IMAGE_FIELD,
    VIDEO_FIELD,
    BatchCreated,
    JobOut,
    ReenactBatch,
    ReenactOptions,
)
from service.signing import UrlSigner
from service.uploads import FileField, inspect_photo, receive_form
from service.webhooks import require_callback_url

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/reenactments", tags=["reenactments"])

DRIVER: Final = "driver"  # the stored upload's name (PyAV probes the content, not the name)
BACKGROUND: Final = "background"
MAX_JSON_BYTES: Final = 64 * 1024  # a JSON reenactment names ids and options, nothing more


def _form_schema() -> dict[str, Any]:
    """The multipart body for OpenAPI (parsed by service.uploads, not by FastAPI)."""
    options = ReenactOptions.model_json_schema()
    binary = {"type": "string", "format": "binary"}
    properties = {
        VIDEO_FIELD: {
            **binary,
            "description": "The driver video (MP4, WebM, MOV, MKV...); or `pose_track_id`.",
        },
        BACKGROUND_IMAGE_FIELD: {
            **binary,
            "description": "With `background=image`: a JPEG, PNG or WebP picture.",
        },
        **options["properties"],
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["avatar_id"],
                        "properties": properties,
                    }
                },
                "application/json": {
                    "schema": {
                        "type": "object",
                        "required": ["avatar_id", "pose_track_id"],
                        "properties": options["properties"],
                    }
                },
            },
        }
    }


def _options(fields: dict[str, str]) -> ReenactOptions:
    try:
        return ReenactOptions.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "the request is not valid", validation_details(exc.errors())
        ) from None


def check_driver(path: Path, settings: Settings) -> VideoInfo:
    """Decode-check the driver and hold it to the configured limits (typed 413/422)."""
    try:
        info = check_video(path)
    except MediaError as exc:
        code = {"truncated_media": "truncated_video"}.get(exc.code, "not_a_video")
        raise ApiError(422, code, "the video cannot be decoded, or it is cut short") from None
    longest = max(info.width, info.height)
    limits = [
        ("video_too_long", info.duration or 0.0, settings.max_video_duration_s, "seconds"),
        ("video_too_large", longest, settings.max_video_resolution, "pixels on its longer side"),
        ("video_too_fast", info.fps, settings.max_video_fps, "frames per second"),
    ]
    for code, value, limit, unit in limits:
        if value > limit:
            raise ApiError(
                413 if code != "video_too_fast" else 422,
                code,
                f"the video may have at most {limit:g} {unit}, it has {value:g}",
                {"limit": limit, "value": value},
            )
    return info


def _store_upload(
    staging: Path, inputs: Path, video: Path | None, background: Path | None, settings: Settings
) -> VideoInfo | None:
    """Check the staged files, give them their stored names, publish the input folder."""
    info = None
    if video is not None:
        info = check_driver(video, settings)
        video.rename(staging / DRIVER)
    if background is not None:
        inspect_photo(background, 0, settings.max_photo_pixels)
        background.rename(staging / BACKGROUND)
    inputs.parent.mkdir(parents=True, exist_ok=True)
    staging.rename(inputs)
    return info


def _require_ready(session: Session, principal: Principal, avatar_id: str) -> None:
    avatar = session.scalar(
        select(Avatar).where(Avatar.id == avatar_id, Avatar.tenant_id == principal.tenant_id)
    )
    if avatar is None:
        raise ApiError(404, "avatar_not_found", "no such avatar", {"avatar_id": avatar_id})
    if avatar.identity_embedding is None:
        raise ApiError(
            409,
            "avatar_not_ready",
            f"the avatar is {avatar.status.value}; wait until it is ready",
            {"status": avatar.status.value},
        )


def _ready_avatar(sessions: sessionmaker[Session], principal: Principal, avatar_id: str) -> None:
    """The early check, before the upload is stored (`_create` checks again)."""
    with session_scope(sessions) as session:
        _require_ready(session, principal, avatar_id)


def _check_quota(sessions: sessionmaker[Session], tenant_id: str, settings: Settings) -> None:
    with session_scope(sessions) as session:
        check_job_quota(session, tenant_id, settings)


def _driver_of(info: VideoInfo) -> dict[str, Any]:
    return {
        "frames": info.num_frames,
        "fps": info.fps,
        "width": info.width,
        "height": info.height,
        "audio": info.has_audio,
    }


def _track_driver(track: PoseTrack) -> dict[str, Any]:
    """What the worker needs to know of a track's driver (as of a video's `_driver_of`)."""
    return {
        "frames": track.frames,
        "fps": track.fps,
        "width": track.width,
        "height": track.height,
        "audio": track.audio,
    }


def _track_job(
    session: Session,
    principal: Principal,
    options: ReenactOptions,
    settings: Settings,
    job_id: str | None = None,
    background: bool = False,
) -> Job:
    """A queued reenactment driven by `options.pose_track_id`, checked (avatar ready, track
    usable with these options) and added to `session`."""
    assert options.pose_track_id is not None
    _require_ready(session, principal, options.avatar_id)
    track = require_usable(
        session, principal, options.pose_track_id, settings, paste_back=options.paste_back
    )
    params = options.model_dump(exclude={"callback_url"})
    params.update(background_image=BACKGROUND if background else None, driver=_track_driver(track))
    job = Job(
        id=job_id or new_id(),
        tenant_id=principal.tenant_id,
        kind=JobKind.REENACT,
        avatar_id=options.avatar_id,
        pose_track_id=track.id,
        stage="queued",
        params=params,
        callback_url=options.callback_url,
    )
    session.add(job)
    return job


def _create(
    sessions: sessionmaker[Session],
    principal: Principal,
    job_id: str,
    options: ReenactOptions,
    info: VideoInfo | None,
    background: bool,
    settings: Settings,
) -> Job:
    with session_scope(sessions) as session:
        # Again in the inserting transaction: concurrent uploads passed the early checks
        # (the avatar may have been deleted meanwhile: 404, not a foreign-key 500).
        check_job_quota(session, principal.tenant_id, settings)
        if info is None:
            return _track_job(session, principal, options, settings, job_id, background)
        _require_ready(session, principal, options.avatar_id)
        params = options.model_dump(exclude={"callback_url"})
        params.update(
            video=DRIVER,
            background_image=BACKGROUND if background else None,
            driver=_driver_of(info),
        )
        job = Job(
            id=job_id,
            tenant_id=principal.tenant_id,
            kind=JobKind.REENACT,
            avatar_id=options.avatar_id,
            stage="queued",
            params=params,
            callback_url=options.callback_url,
        )
        session.add(job)
    return job


def _forget(sessions: sessionmaker[Session], *job_ids: str) -> None:
    with session_scope(sessions) as session:
        for job_id in job_ids:
            job = session.get(Job, job_id)
            if job is not None:
                session.delete(job)


def _check_driver_choice(has_video: bool, options: ReenactOptions) -> None:
    """Exactly one driver: an uploaded video or a stored pose track (typed 422s)."""
    if has_video and options.pose_track_id is not None:
        raise ApiError(
            422,
            "conflicting_driver",
            f"send either `{VIDEO_FIELD}` or `pose_track_id`, not both",
        )
    if not has_video and options.pose_track_id is None:
        raise ApiError(
            422, "no_video", f"send the driver video as `{VIDEO_FIELD}`, or a `pose_track_id`"
        )


@router.post(
    "",
    status_code=ACCEPTED,
    response_model=JobOut,
    summary="Reenact an avatar with a driver video",
    openapi_extra=_form_schema(),
    responses={
        404: error_examples(
            ApiError(404, "avatar_not_found", "no such avatar", {"avatar_id": "..."}),
            ApiError(404, "pose_track_not_found", "no such pose track", {"pose_track_id": "..."}),
        ),
        409: error_examples(
            ApiError(
                409,
                "avatar_not_ready",
                "the avatar is pending; wait until it is ready",
                {"status": "pending"},
            ),
            ApiError(
                409,
                "pose_track_stale",
                "the pose track was encoded by another pose encoder than the one served now",
                {"encoder": "134a22354411023e", "served": "9f0e1d2c3b4a5968"},
            ),
        ),
        410: error_example(
            "pose_track_expired", "the pose track was deleted after its retention period"
        ),
        413: error_example(
            "video_too_long",
            "the video may have at most 300 seconds, it has 412.5",
            {"limit": 300.0, "value": 412.5},
        ),
        415: error_example("unsupported_media_type", "send the request as multipart/form-data"),
        422: error_example("truncated_video", "the video cannot be decoded, or it is cut short"),
        429: error_examples(
            ApiError(429, "rate_limited", "at most 120 requests per minute for this API key"),
            ApiError(
                429,
                "quota_exceeded",
                "at most 10 queued or running jobs; wait for one to finish",
                {"quota": "active_jobs", "limit": 10, "used": 10},
            ),
            headers={"Retry-After": "Seconds to wait."},
        ),
        503: error_example("queue_unavailable", "the job queue is unavailable"),
    },
)
async def create_reenactment(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    sessions: SessionsDep,
    signer: SignerDep,
    idempotency_key: IdempotencyKeyDep,
) -> JobOut | Response:
    """Upload a driver video, or name a stored pose track, for one of your avatars; poll
    `GET /v1/jobs/{id}`.

    The result (when the job succeeds) is the avatar performing the driver's head pose and
    expression, one frame per driver frame at the driver's frame rate, with the driver's
    audio; `result.video` and `result.mask` download it (`*_url`: signed links). A
    `pose_track_id` (multipart field, or a JSON body) replaces the upload: 422
    `conflicting_driver` with both, `no_video` with neither. 429 `quota_exceeded` when the
    tenant has `max_active_jobs_per_tenant` unfinished jobs. With an `Idempotency-Key`, a
    retry of the same request gets the first response again.
    """
    tenant_id, job_id = principal.tenant_id, new_id()
    if idempotency_key is None:  # refused before the upload is read (see create_avatar)
        await run_in_threadpool(_check_quota, sessions, tenant_id, settings)
    if is_json(request):
        return await _create_from_json(
            request, response, principal, settings, queue, sessions, signer, idempotency_key
        )
    inputs = store.job_input_dir(tenant_id, job_id)
    staging = inputs.with_name(f".{inputs.name}.partial")
    files = [
        FileField(VIDEO_FIELD, 1, settings.max_video_bytes, "video_too_large", "video"),
        FileField(
            BACKGROUND_IMAGE_FIELD, 1, settings.max_background_bytes, "photo_too_large", "image"
        ),
    ]
    idempotent = IdempotentRequest(sessions, tenant_id, idempotency_key, settings)
    try:
        form = await receive_form(request, staging, files)
        options = _options(form.fields)
        video, background = form.file(VIDEO_FIELD), form.file(BACKGROUND_IMAGE_FIELD)
        _check_driver_choice(video is not None, options)
        if (background is not None) != (options.background == "image"):
            raise ApiError(
                422,
                "invalid_request",
                f"send `{BACKGROUND_IMAGE_FIELD}` exactly when background=image",
            )
        if options.callback_url is not None:
            await run_in_threadpool(require_callback_url, options.callback_url, settings)
        replay = await idempotent.replay(
            request, form.fields, form.files, lambda body: f"/v1/jobs/{body['id']}"
        )
        if replay is not None:
            store.delete_job(tenant_id, job_id)  # only this upload's staging
            return replay
        await run_in_threadpool(_ready_avatar, sessions, principal, options.avatar_id)
        info = await run_in_threadpool(_store_upload, staging, inputs, video, background, settings)
        if info is not None or background is not None:
            await run_in_threadpool(store.push, inputs)  # before a worker looks for them
        job = await run_in_threadpool(
            _create, sessions, principal, job_id, options, info, background is not None, settings
        )
        # Only after the commit: a worker must find the job it is handed.
        try:
            await run_in_threadpool(queue.enqueue, REENACT_TASK, job.id)
        except Exception as exc:  # kombu's OperationalError, redis errors: nothing was queued
            logger.warning("enqueue of job %s failed: %s", job.id, exc)
            await run_in_threadpool(_forget, sessions, job.id)
            raise unavailable(
                "queue_unavailable", "the job queue is unavailable", settings.retry_after_s
            ) from None
    except BaseException:
        store.delete_job(tenant_id, job_id)  # no row refers to this upload
        await idempotent.failed()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    created = JobOut.of(job, signer)
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


async def _create_from_json(
    request: Request,
    response: Response,
    principal: Principal,
    settings: Settings,
    queue: TaskQueue,
    sessions: sessionmaker[Session],
    signer: UrlSigner | None,
    idempotency_key: str | None,
) -> JobOut | Response:
    """`POST /v1/reenactments` with a JSON body: a pose track drives the avatar (no upload,
    so no background image either)."""
    options = parse(ReenactOptions, await read_json(request, MAX_JSON_BYTES))
    _check_driver_choice(False, options)
    if options.background == "image":
        raise ApiError(
            422, "invalid_request", "background=image needs a multipart upload of the image"
        )
    if options.callback_url is not None:
        await run_in_threadpool(require_callback_url, options.callback_url, settings)
    idempotent = IdempotentRequest(sessions, principal.tenant_id, idempotency_key, settings)
    fields = {"json": options.model_dump_json()}
    replay = await idempotent.replay(request, fields, {}, lambda body: f"/v1/jobs/{body['id']}")
    if replay is not None:
        return replay
    try:
        jobs = await run_in_threadpool(_create_track_jobs, sessions, principal, [options], settings)
        await _enqueue(queue, sessions, jobs, settings)
    except BaseException:
        await idempotent.failed()
        raise
    created = JobOut.of(jobs[0], signer)
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{created.id}"
    return created


def _create_track_jobs(
    sessions: sessionmaker[Session],
    principal: Principal,
    options: list[ReenactOptions],
    settings: Settings,
) -> list[Job]:
    """Queued track-driven jobs, all or none: quota for all of them, every avatar ready."""
    with session_scope(sessions) as session:
        check_job_quota(session, principal.tenant_id, settings)  # locks the tenant's row
        active = int(
            session.scalar(
                select(func.count(Job.id)).where(
                    Job.tenant_id == principal.tenant_id, Job.status.in_(ACTIVE)
                )
            )
            or 0
        )
        limit = settings.max_active_jobs_per_tenant
        if active + len(options) > limit:
            raise ApiError(
                429,
                "quota_exceeded",
                f"at most {limit} queued or running jobs: {active} are, {len(options)} more "
                "would exceed it",
                {"quota": "active_jobs", "limit": limit, "used": active},
                {"Retry-After": str(settings.quota_retry_after_s)},
            )
        return [_track_job(session, principal, o, settings) for o in options]


async def _enqueue(
    queue: TaskQueue, sessions: sessionmaker[Session], jobs: list[Job], settings: Settings
) -> None:
    """Publish each job (after their commit); on a broker error remove them all (a task
    already published finds no job and does nothing) and answer 503."""
    try:
        for job in jobs:
            await run_in_threadpool(queue.enqueue, REENACT_TASK, job.id)
    except Exception as exc:  # kombu's OperationalError, redis errors
        logger.warning("enqueue of jobs %s failed: %s", [j.id for j in jobs], exc)
        await run_in_threadpool(_forget, sessions, *(j.id for j in jobs))
        raise unavailable(
            "queue_unavailable", "the job queue is unavailable", settings.retry_after_s
        ) from None


@router.post(
    "/batch",
    status_code=ACCEPTED,
    response_model=BatchCreated,
    summary="Drive several avatars with one pose track",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(ReenactBatch)}},
        }
    },
    responses={
        404: error_examples(
            ApiError(404, "avatar_not_found", "no such avatar", {"avatar_id": "..."}),
            ApiError(404, "pose_track_not_found", "no such pose track", {"pose_track_id": "..."}),
        ),
        409: error_example(
            "pose_track_not_ready",
            "the pose track is pending; wait until it is ready",
            {"status": "pending"},
        ),
        410: error_example(
            "pose_track_expired", "the pose track was deleted after its retention period"
        ),
        422: error_example(
            "too_many_avatars", "at most 20 avatars per batch", {"limit": 20, "value": 25}
        ),
        429: error_example(
            "quota_exceeded",
            "at most 10 queued or running jobs: 8 are, 3 more would exceed it",
            {"quota": "active_jobs", "limit": 10, "used": 8},
        ),
        503: error_example("queue_unavailable", "the job queue is unavailable"),
    },
)
async def create_batch(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    queue: QueueDep,
    sessions: SessionsDep,
    signer: SignerDep,
    idempotency_key: IdempotencyKeyDep,
) -> BatchCreated | Response:
    """One reenactment job per avatar, all driven by the same stored pose track (nothing is
    decoded or pose-encoded again): all are queued or none (quota for all of them, every
    avatar ready, the track usable). Poll each `GET /v1/jobs/{id}`. With an
    `Idempotency-Key`, a retry gets the same jobs back."""
    batch = parse(ReenactBatch, await read_json(request, MAX_JSON_BYTES))
    limit = settings.max_batch_avatars
    if len(batch.avatar_ids) > limit:
        raise ApiError(
            422,
            "too_many_avatars",
            f"at most {limit} avatars per batch",
            {"limit": limit, "value": len(batch.avatar_ids)},
        )
    if len(set(batch.avatar_ids)) != len(batch.avatar_ids):
        raise ApiError(422, "invalid_request", "`avatar_ids` must be distinct")
    try:
        options = [batch.job_options(avatar_id) for avatar_id in batch.avatar_ids]
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "the request is not valid", validation_details(exc.errors())
        ) from None
    if batch.callback_url is not None:
        await run_in_threadpool(require_callback_url, batch.callback_url, settings)
    idempotent = IdempotentRequest(sessions, principal.tenant_id, idempotency_key, settings)
    fields = {"json": batch.model_dump_json()}
    replay = await idempotent.replay(
        request, fields, {}, lambda body: f"/v1/jobs/{body['jobs'][0]['id']}"
    )
    if replay is not None:
        return replay
    try:
        jobs = await run_in_threadpool(_create_track_jobs, sessions, principal, options, settings)
        await _enqueue(queue, sessions, jobs, settings)
    except BaseException:
        await idempotent.failed()
        raise
    created = BatchCreated(jobs=[JobOut.of(job, signer) for job in jobs])
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{jobs[0].id}"
    return created
