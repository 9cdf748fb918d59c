"""Avatars: create from 1-32 photos (202 + a job), list, get, delete, fine-tune preview.

An avatar is usable zero-shot (identity embedding) once its job's preprocess stage is done;
with `fine_tune` light/full the same job goes on to fine-tune, and its weights take over when
it succeeds. Every query is filtered by the caller's tenant: other tenants' avatars are 404.
Creation is bounded by the tenant's quotas and may carry an Idempotency-Key.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Final

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from pydantic import ValidationError
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from media.faces import shared_detector
from service.api.deps import (
    PrincipalDep,
    QueueDep,
    SessionDep,
    SessionsDep,
    SettingsDep,
    StoreDep,
)
from service.api.paging import CursorQuery, LimitQuery, fetch_page
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
from service.models import Avatar, AvatarStatus, FineTune, Job, JobKind, JobStatus, new_id
from service.queue import PREPROCESS_TASK
from service.quotas import check_avatar_quota, check_job_quota
from service.schemas import AvatarCreated, AvatarOptions, AvatarOut, JobOut, Page
from service.storage import ArtifactStore, served_avatar_key, unpublish_served_avatar
from service.uploads import (
    FACE_CHECK_SIDE,
    PHOTO_FIELD,
    check_one_face,
    inspect_photo,
    load_photo,
    receive_photos,
)
from service.webhooks import require_callback_url

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/avatars", tags=["avatars"])

NOT_FOUND: Final = error_example("not_found", "no such avatar")
TOO_MANY: Final = error_examples(
    ApiError(429, "rate_limited", "at most 120 requests per minute for this API key"),
    ApiError(
        429,
        "quota_exceeded",
        "at most 100 avatars; delete one first",
        {"quota": "avatars", "limit": 100, "used": 100},
    ),
    headers={
        "Retry-After": "Seconds to wait (rate limit and active-jobs quota).",
        "X-RateLimit-Limit": "Requests per minute allowed for this API key.",
        "X-RateLimit-Remaining": "Requests left now (also sent on successful responses).",
        "X-RateLimit-Reset": "Seconds until the whole limit is available again.",
    },
)


def _form_schema() -> dict[str, Any]:
    """The multipart body for OpenAPI: the photos plus AvatarOptions' fields (the body is
    parsed by service.uploads, so FastAPI cannot derive this)."""
    options = AvatarOptions.model_json_schema()
    photos = {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": 1,
        "description": "1-32 photos of one person (JPEG, PNG or WebP). Their filenames and "
        "declared types are ignored: each is decoded to check it.",
    }
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": [PHOTO_FIELD],
                        "properties": {PHOTO_FIELD: photos, **options["properties"]},
                    },
                    "encoding": {PHOTO_FIELD: {"contentType": "image/jpeg, image/png, image/webp"}},
                }
            },
        }
    }


# --- helpers ---------------------------------------------------------------------------------


def _options(fields: dict[str, str], settings: Settings) -> AvatarOptions:
    try:
        options = AvatarOptions.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(
            422, "invalid_request", "the request is not valid", validation_details(exc.errors())
        ) from None
    if options.steps is not None:
        if options.fine_tune is FineTune.NONE:
            raise ApiError(422, "invalid_request", "`steps` needs fine_tune light or full")
        if options.steps > settings.max_finetune_steps:
            raise ApiError(
                422,
                "invalid_request",
                f"`steps` may be at most {settings.max_finetune_steps}",
                {"max_steps": settings.max_finetune_steps},
            )
    return options


def _store_photos(staging: Path, photos_dir: Path, photos: list[Path], settings: Settings) -> None:
    """Decode every staged photo (and, if enabled, check it shows one face), name it by index
    and decoded format, publish the folder."""
    for index, path in enumerate(photos):
        info = inspect_photo(path, index, settings.max_photo_pixels)
        if settings.photo_face_check:
            rgb = load_photo(path, settings.max_photo_pixels, max_side=FACE_CHECK_SIDE)
            check_one_face(rgb, index, shared_detector())
        path.rename(path.with_suffix(f".{info.extension}"))
    staging.rename(photos_dir)


def _check_quotas(sessions: sessionmaker[Session], tenant_id: str, settings: Settings) -> None:
    with session_scope(sessions) as session:
        check_avatar_quota(session, tenant_id, settings)
        check_job_quota(session, tenant_id, settings)


def _create(
    sessions: sessionmaker[Session],
    principal: Principal,
    avatar_id: str,
    options: AvatarOptions,
    n: int,
    settings: Settings,
) -> tuple[Avatar, Job]:
    with session_scope(sessions) as session:
        # Again in the inserting transaction: concurrent uploads passed the early check.
        check_avatar_quota(session, principal.tenant_id, settings)
        check_job_quota(session, principal.tenant_id, settings)
        avatar = Avatar(
            id=avatar_id,
            tenant_id=principal.tenant_id,
            name=options.name,
            status=AvatarStatus.PENDING,
            fine_tune=options.fine_tune,
        )
        kind = JobKind.PREPROCESS if options.fine_tune is FineTune.NONE else JobKind.FINETUNE
        job = Job(
            tenant_id=principal.tenant_id,
            kind=kind,
            avatar_id=avatar_id,
            stage="queued",
            callback_url=options.callback_url,
            params={
                "avatar_id": avatar_id,
                "fine_tune": options.fine_tune.value,
                "steps": options.steps,
                "photos": n,
            },
        )
        session.add_all([avatar, job])
    return avatar, job


def _forget(sessions: sessionmaker[Session], avatar_id: str, job_id: str) -> None:
    with session_scope(sessions) as session:
        session.execute(delete(Job).where(Job.id == job_id))
        session.execute(delete(Avatar).where(Avatar.id == avatar_id))


def _latest_jobs(session: Session, avatar_ids: list[str]) -> dict[str, str]:
    stmt = (  # the jobs that make the avatar, not the reenactments that use it
        select(Job.avatar_id, Job.id)
        .where(Job.avatar_id.in_(avatar_ids), Job.kind.in_((JobKind.PREPROCESS, JobKind.FINETUNE)))
        .order_by(Job.created_at, Job.id)
    )
    return {avatar_id: job_id for avatar_id, job_id in session.execute(stmt) if avatar_id}


def get_avatar_or_404(session: Session, principal: Principal, avatar_id: str) -> Avatar:
    avatar = session.scalar(
        select(Avatar).where(Avatar.id == avatar_id, Avatar.tenant_id == principal.tenant_id)
    )
    if avatar is None:
        raise ApiError(404, "not_found", "no such avatar")
    return avatar


# --- routes ----------------------------------------------------------------------------------


@router.post(
    "",
    status_code=ACCEPTED,
    response_model=AvatarCreated,
    summary="Create an avatar from 1-32 photos",
    openapi_extra=_form_schema(),
    responses={
        400: error_example("malformed_multipart", "the multipart body is malformed"),
        409: error_example(
            "idempotency_in_progress",
            "a request with this Idempotency-Key is still in progress; retry later",
        ),
        413: error_example(
            "photo_too_large", "a photo may be at most 20971520 bytes", {"photo": 0}
        ),
        415: error_example("unsupported_media_type", "send the photos as multipart/form-data"),
        422: error_examples(
            ApiError(422, "not_an_image", "a photo is not a JPEG, PNG or WebP image", {"photo": 1}),
            ApiError(
                422,
                "idempotency_key_reused",
                "this Idempotency-Key was used with a different request; use a new key",
            ),
        ),
        429: TOO_MANY,
        503: error_example("queue_unavailable", "the job queue is unavailable"),
    },
)
async def create_avatar(
    request: Request,
    response: Response,
    principal: PrincipalDep,
    settings: SettingsDep,
    store: StoreDep,
    queue: QueueDep,
    sessions: SessionsDep,
    idempotency_key: IdempotencyKeyDep,
) -> AvatarCreated | Response:
    """Store the photos and queue the avatar's job; poll `GET /v1/jobs/{job.id}`.

    Photos are streamed to disk and rejected as soon as one exceeds `max_photo_bytes` (413
    `photo_too_large`) or there are more than `max_photos` (413 `too_many_photos`); each is
    then decoded: 422 `not_an_image`, 413 `photo_too_large` for too many pixels, 422
    `no_photos` if there are none. The avatar is `ready` (zero-shot) once the job's
    preprocess stage is done; a fine-tuned one replaces it when the job succeeds.

    429 `quota_exceeded` when the tenant has `max_avatars_per_tenant` avatars or
    `max_active_jobs_per_tenant` queued or running jobs. With an `Idempotency-Key`, a retry
    of the same request gets the first response again (`Idempotent-Replayed: true`), not a
    second avatar.
    """
    tenant_id, avatar_id = principal.tenant_id, new_id()
    if idempotency_key is None:
        # Refused before the upload is read. Not with a key: this may be the retry of a request
        # that succeeded, and the quota it used up must not hide its replay.
        await run_in_threadpool(_check_quotas, sessions, tenant_id, settings)
    staging = store.staging_dir(tenant_id, avatar_id)
    idempotent = IdempotentRequest(sessions, tenant_id, idempotency_key, settings)
    try:
        form = await receive_photos(
            request,
            staging,
            max_photos=settings.max_photos,
            max_photo_bytes=settings.max_photo_bytes,
        )
        options = _options(form.fields, settings)
        if options.callback_url is not None:
            await run_in_threadpool(require_callback_url, options.callback_url, settings)
        if not form.photos:
            raise ApiError(422, "no_photos", f"send 1-{settings.max_photos} photos as `photos`")
        replay = await idempotent.replay(request, form.fields, form.files, _location)
        if replay is not None:
            store.delete_avatar(tenant_id, avatar_id)  # only this upload's staging
            return replay
        photos_dir = store.photos_dir(tenant_id, avatar_id)
        await run_in_threadpool(_store_photos, staging, photos_dir, form.photos, settings)
        await run_in_threadpool(store.push, photos_dir)  # before a worker looks for them
        avatar, job = await run_in_threadpool(
            _create, sessions, principal, avatar_id, options, len(form.photos), settings
        )
        # Only after the commit: a worker must find the job it is handed.
        try:
            await run_in_threadpool(queue.enqueue, PREPROCESS_TASK, job.id)
        except Exception as exc:  # kombu's OperationalError, redis errors: nothing was queued
            logger.warning("enqueue of job %s failed: %s", job.id, exc)
            await run_in_threadpool(_forget, sessions, avatar_id, job.id)
            raise unavailable(
                "queue_unavailable", "the job queue is unavailable", settings.retry_after_s
            ) from None
    except BaseException:
        store.delete_avatar(tenant_id, avatar_id)  # no row refers to this upload
        await idempotent.failed()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    created = AvatarCreated(avatar=AvatarOut.of(avatar, job.id), job=JobOut.of(job))
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


def _location(body: Any) -> str:
    """The Location of a created avatar's response body: its job."""
    return f"/v1/jobs/{body['job']['id']}"


@router.get("", summary="List avatars, newest first")
def list_avatars(
    principal: PrincipalDep,
    session: SessionDep,
    limit: LimitQuery = 20,
    cursor: CursorQuery = None,
) -> Page[AvatarOut]:
    """The caller's avatars; `next_cursor` fetches the next page."""
    stmt = select(Avatar).where(Avatar.tenant_id == principal.tenant_id)
    avatars, next_cursor = fetch_page(session, stmt, Avatar.created_at, Avatar.id, limit, cursor)
    jobs = _latest_jobs(session, [a.id for a in avatars])
    items = [AvatarOut.of(a, jobs.get(a.id)) for a in avatars]
    return Page[AvatarOut](items=items, next_cursor=next_cursor)


@router.get("/{avatar_id}", summary="One avatar", responses={404: NOT_FOUND})
def get_avatar(avatar_id: str, principal: PrincipalDep, session: SessionDep) -> AvatarOut:
    """The avatar and its latest job id."""
    avatar = get_avatar_or_404(session, principal, avatar_id)
    return AvatarOut.of(avatar, _latest_jobs(session, [avatar.id]).get(avatar.id))


@router.get(
    "/{avatar_id}/preview",
    summary="The fine-tune preview PNG",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, 404: NOT_FOUND},
)
def get_preview(
    avatar_id: str, principal: PrincipalDep, session: SessionDep, store: StoreDep
) -> FileResponse:
    """Photos (top row) above the fine-tuned avatar's reconstructions of them."""
    avatar = get_avatar_or_404(session, principal, avatar_id)
    preview = _preview_path(store, avatar)
    if preview is None:
        raise ApiError(404, "not_found", "this avatar has no fine-tune preview")
    return FileResponse(preview, media_type="image/png")


def _preview_path(store: ArtifactStore, avatar: Avatar) -> Path | None:
    if avatar.artifact_path is None:
        return None
    path = store.resolve(avatar.artifact_path).with_suffix(".png")
    return path if path.is_file() or store.pull(path) else None


@router.delete(
    "/{avatar_id}",
    status_code=204,
    summary="Delete an avatar and its files",
    responses={404: NOT_FOUND},
)
def delete_avatar(
    avatar_id: str,
    principal: PrincipalDep,
    session: SessionDep,
    store: StoreDep,
    settings: SettingsDep,
) -> Response:
    """Cancel the avatar's unfinished jobs, delete it, then remove its photos and weights,
    the copy of its weights published to Triton included.

    A worker still running one of those jobs stops at its next progress check.
    """
    avatar = get_avatar_or_404(session, principal, avatar_id)
    served = served_avatar_key(avatar.artifact_path) if avatar.artifact_path else None
    unfinished = session.scalars(
        select(Job.id).where(Job.avatar_id == avatar.id, Job.status.not_in(TERMINAL))
    )
    for job_id in list(unfinished):
        transition(session, job_id, JobStatus.CANCELED, stage="canceled")
    session.delete(avatar)
    session.commit()  # files go only once the rows are gone, so a failed commit loses nothing
    store.delete_avatar(principal.tenant_id, avatar_id)
    store.drop_dir(store.avatar_dir(principal.tenant_id, avatar_id))
    if served is not None:  # a hard link would keep the weights servable
        unpublish_served_avatar(settings.served_avatars_dir, served)
    return Response(status_code=204)
