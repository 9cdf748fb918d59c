"""Pose-space control (the paper's Fig. 4): render an avatar from poses you choose - explicit
descriptors, keyframes interpolated on the descriptor sphere, or a stored track retimed and
smoothed - as a `render` job on the reenact queue (generator only, no driver video).

The request is resolved here into one (T, D) float32 array (model.pose_space, numpy only,
imported on first use so that the API's start loads nothing of model/), checked against the
limits with typed 422s, and stored as the job's input; the worker only renders it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
from fastapi import APIRouter, Request, Response
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.api.body import inline_schema, parse, read_json
from service.api.deps import (
    PrincipalDep,
    QueueDep,
    SessionsDep,
    SettingsDep,
    SignerDep,
    StoreDep,
)
from service.api.routes.avatars import get_avatar_or_404
from service.auth import Principal
from service.config import Settings
from service.db import session_scope
from service.errors import ApiError, error_example, error_examples, unavailable
from service.idempotency import ACCEPTED, IdempotencyKeyDep, IdempotentRequest
from service.models import Job, JobKind, PoseTrack, new_id
from service.pose_tracks import (
    DESCRIPTORS,
    checkpoint_pose_dim,
    load_track,
    require_usable,
    track_dir,
)
from service.queue import REENACT_TASK
from service.quotas import check_job_quota
from service.schemas import JobOut, Keyframe, RenderRequest
from service.storage import ArtifactStore
from service.webhooks import require_callback_url

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1/avatars", tags=["avatars"])

POSES_FILE: Final = "poses.npy"
DEFAULT_FPS: Final = 25.0
DEFAULT_POSE_DIM: Final = 256  # the paper's D_pose; every preset keeps it (model/config.py)
JSON_BYTES_PER_FLOAT: Final = 32  # "-0.12345678901234567, " with room to spare
_ITEMSIZE: Final = {"float16": 2, "float32": 4}


@dataclass(frozen=True)
class Resolved:
    """A render request made concrete: the poses to render, frame by frame."""

    poses: np.ndarray  # (T, D) float32
    fps: float
    pose_track_id: str | None


# --- resolving a request into poses ----------------------------------------------------------


def _pose_dim(settings: Settings) -> int:
    return checkpoint_pose_dim(settings.base_checkpoint) or DEFAULT_POSE_DIM


def _too_many(count: int, settings: Settings) -> None:
    limit = settings.max_render_frames
    if count > limit:
        raise ApiError(
            422,
            "too_many_frames",
            f"a render may have at most {limit} frames, this one has {count}",
            {"limit": limit, "value": count},
        )


def _checked(poses: np.ndarray, dim: int, where: str) -> np.ndarray:
    """(T, D) float32 with D == dim and every value finite, or a typed 422."""
    if poses.ndim != 2 or poses.shape[1] != dim:
        got = poses.shape[1] if poses.ndim == 2 else None
        raise ApiError(
            422,
            "pose_dim_mismatch",
            f"each pose must have {dim} floats ({where})",
            {"expected": dim, "got": got},
        )
    if not np.isfinite(poses).all():
        raise ApiError(422, "non_finite_pose", f"poses contain NaN or infinity ({where})")
    return np.ascontiguousarray(poses, dtype=np.float32)


def _rows(rows: Sequence[Sequence[float]], dim: int, where: str) -> np.ndarray:
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise ApiError(
                422,
                "pose_dim_mismatch",
                f"each pose must have {dim} floats; {where} {i} has {len(row)}",
                {"expected": dim, "got": len(row), "index": i},
            )
    return _checked(np.asarray(rows, dtype=np.float64).reshape(len(rows), dim), dim, where)


def _from_b64(text: str, dtype: str, dim: int, settings: Settings) -> np.ndarray:
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_request", "`poses_b64` is not base64") from None
    row = dim * _ITEMSIZE[dtype]
    if not raw:
        raise ApiError(422, "no_poses", "`poses_b64` holds no poses")
    if len(raw) % row:
        raise ApiError(
            422,
            "pose_dim_mismatch",
            f"`poses_b64` must hold whole rows of {dim} {dtype} values ({row} bytes each)",
            {"expected": dim, "bytes": len(raw)},
        )
    _too_many(len(raw) // row, settings)
    array = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(-1, dim)
    return _checked(array.astype(np.float32), dim, "poses_b64")


class _Tracks:
    """Ready tracks of the caller, each checked and loaded once per request."""

    def __init__(
        self, session: Session, principal: Principal, store: ArtifactStore, settings: Settings
    ) -> None:
        self.session, self.principal, self.store, self.settings = (
            session,
            principal,
            store,
            settings,
        )
        self._loaded: dict[str, tuple[PoseTrack, Any]] = {}

    def get(self, track_id: str) -> tuple[PoseTrack, Any]:
        if track_id not in self._loaded:
            track = require_usable(self.session, self.principal, track_id, self.settings)
            path = track_dir(self.store, track.tenant_id, track.id) / DESCRIPTORS
            if not self.store.pull(path):
                raise ApiError(
                    410,
                    "pose_track_expired",
                    "the pose track was deleted after its retention period",
                )
            self._loaded[track_id] = (track, load_track(path))
        return self._loaded[track_id]


def _keyframe_pose(key: Keyframe, index: int, dim: int, tracks: _Tracks) -> np.ndarray:
    if key.pose is not None:
        return _rows([key.pose], dim, f"keyframe {index}")[0]
    assert key.pose_track_id is not None
    assert key.frame is not None
    _, data = tracks.get(key.pose_track_id)
    if key.frame >= len(data.poses):
        raise ApiError(
            422,
            "frame_out_of_range",
            f"keyframe {index}: the pose track has {len(data.poses)} frames",
            {"index": index, "frame": key.frame, "frames": len(data.poses)},
        )
    return _checked(data.poses[key.frame][None], dim, f"keyframe {index}")[0]


def _from_keyframes(req: RenderRequest, fps: float, dim: int, tracks: _Tracks) -> np.ndarray:
    from model import pose_space

    keys = req.keyframes or []
    if not keys:
        raise ApiError(422, "no_keyframes", "`keyframes` is empty; give at least one")
    times = [k.t for k in keys]
    if any(b <= a for a, b in itertools.pairwise(times)):
        raise ApiError(422, "unsorted_keyframes", "keyframe times must strictly increase")
    try:
        count = pose_space.keyframe_frame_count(times, fps)
    except ValueError as exc:  # two keyframes on one frame at this fps
        raise ApiError(422, "unsorted_keyframes", str(exc)) from None
    _too_many(count, tracks.settings)
    poses = np.stack([_keyframe_pose(k, i, dim, tracks) for i, k in enumerate(keys)])
    return pose_space.interpolate_keyframes(times, poses, fps, req.interpolation)


def _from_track(req: RenderRequest, dim: int, tracks: _Tracks) -> tuple[np.ndarray, float]:
    from model import pose_space

    assert req.pose_track_id is not None
    track, data = tracks.get(req.pose_track_id)
    fps = req.fps or float(track.fps or DEFAULT_FPS)
    try:
        count = pose_space.retime_frame_count(data.times, fps, req.speed, req.start_s, req.end_s)
    except ValueError as exc:
        raise ApiError(
            422,
            "invalid_time_range",
            str(exc),
            {"start_s": float(data.times[0]), "end_s": float(data.times[-1])},
        ) from None
    _too_many(count, tracks.settings)
    poses = _checked(data.poses, dim, "pose track")
    return pose_space.retime(
        poses, data.times, fps, req.speed, req.start_s, req.end_s, req.resample
    ), fps


def resolve(
    req: RenderRequest,
    session: Session,
    principal: Principal,
    store: ArtifactStore,
    settings: Settings,
) -> Resolved:
    """The request's poses, frame by frame, or a typed 4xx (see the route)."""
    from model import pose_space

    dim = _pose_dim(settings)
    tracks = _Tracks(session, principal, store, settings)
    fps = req.fps or DEFAULT_FPS
    if req.poses is not None:
        if not req.poses:
            raise ApiError(422, "no_poses", "`poses` is empty")
        _too_many(len(req.poses), settings)
        poses = _rows(req.poses, dim, "pose")
    elif req.poses_b64 is not None:
        poses = _from_b64(req.poses_b64, req.dtype, dim, settings)
    elif req.keyframes is not None:
        poses = _from_keyframes(req, fps, dim, tracks)
    else:
        poses, fps = _from_track(req, dim, tracks)
    if req.smooth_sigma_frames > 0:
        poses = pose_space.smooth(poses, req.smooth_sigma_frames)
    _too_many(len(poses), settings)
    return Resolved(poses, fps, req.pose_track_id)


def _resolve_in_session(
    sessions: sessionmaker[Session],
    req: RenderRequest,
    principal: Principal,
    store: ArtifactStore,
    settings: Settings,
    avatar_id: str,
) -> Resolved:
    with session_scope(sessions) as session:
        _require_ready(session, principal, avatar_id)
        return resolve(req, session, principal, store, settings)


def _require_ready(session: Session, principal: Principal, avatar_id: str) -> None:
    avatar = get_avatar_or_404(session, principal, avatar_id)
    if avatar.identity_embedding is None:
        raise ApiError(
            409,
            "avatar_not_ready",
            f"the avatar is {avatar.status.value}; wait until it is ready",
            {"status": avatar.status.value},
        )


# --- the job ---------------------------------------------------------------------------------


def _store_poses(store: ArtifactStore, inputs: Path, poses: np.ndarray) -> None:
    path = inputs / POSES_FILE
    with store.atomic(path) as f:
        np.save(f, poses.astype("<f4"), allow_pickle=False)
    store.push(path)


def _create(
    sessions: sessionmaker[Session],
    principal: Principal,
    job_id: str,
    avatar_id: str,
    req: RenderRequest,
    resolved: Resolved,
    settings: Settings,
) -> Job:
    with session_scope(sessions) as session:
        check_job_quota(session, principal.tenant_id, settings)
        _require_ready(session, principal, avatar_id)
        job = Job(
            id=job_id,
            tenant_id=principal.tenant_id,
            kind=JobKind.RENDER,
            avatar_id=avatar_id,
            stage="queued",
            callback_url=req.callback_url,
            params={
                "avatar_id": avatar_id,
                "output": req.output,
                "fps": resolved.fps,
                "frames": len(resolved.poses),
                "poses": POSES_FILE,
                "source": req.source,
                "source_pose_track_id": resolved.pose_track_id,
            },
        )
        session.add(job)
    return job


def _forget(sessions: sessionmaker[Session], job_id: str) -> None:
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        if job is not None:
            session.delete(job)


def _max_body(settings: Settings) -> int:
    return settings.max_render_frames * _pose_dim(settings) * JSON_BYTES_PER_FLOAT + 2**20


@router.post(
    "/{avatar_id}/render",
    status_code=ACCEPTED,
    response_model=JobOut,
    summary="Render an avatar from explicit poses, keyframes or a retimed pose track",
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_schema(RenderRequest)}},
        }
    },
    responses={
        404: error_examples(
            ApiError(404, "not_found", "no such avatar"),
            ApiError(404, "pose_track_not_found", "no such pose track", {"pose_track_id": "..."}),
        ),
        409: error_example(
            "avatar_not_ready",
            "the avatar is pending; wait until it is ready",
            {"status": "pending"},
        ),
        410: error_example(
            "pose_track_expired", "the pose track was deleted after its retention period"
        ),
        413: error_example(
            "payload_too_large", "the request may be at most 25624576 bytes", {"max_bytes": 1}
        ),
        415: error_example("unsupported_media_type", "send the request as application/json"),
        422: error_examples(
            ApiError(
                422,
                "pose_dim_mismatch",
                "each pose must have 256 floats; pose 3 has 255",
                {"expected": 256, "got": 255, "index": 3},
            ),
            ApiError(422, "non_finite_pose", "poses contain NaN or infinity (pose)"),
            ApiError(
                422,
                "too_many_frames",
                "a render may have at most 3000 frames, this one has 4000",
                {"limit": 3000, "value": 4000},
            ),
            ApiError(422, "no_keyframes", "`keyframes` is empty; give at least one"),
            ApiError(422, "unsorted_keyframes", "keyframe times must strictly increase"),
        ),
        429: error_example(
            "quota_exceeded",
            "at most 10 queued or running jobs; wait for one to finish",
            {"quota": "active_jobs", "limit": 10, "used": 10},
        ),
        503: error_example("queue_unavailable", "the job queue is unavailable"),
    },
)
async def render_avatar(
    avatar_id: str,
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
    """Queue a `render` job: the avatar in the given poses, one frame per pose; poll
    `GET /v1/jobs/{id}`, then download `result.video` + `result.mask` (`mp4`) or
    `result.zip` (`png_zip`).

    Sources: `poses` / `poses_b64` (descriptors, e.g. edited ones from
    `GET /v1/pose-tracks/{id}/descriptors`), `keyframes` (`{"t", "pose"}` or
    `{"t", "pose_track_id", "frame"}`, slerped at `fps`; each keyframe's frame equals its
    pose exactly), or `pose_track_id` with `speed`, `start_s`, `end_s`, `resample`. Any
    source may be smoothed (`smooth_sigma_frames`). At most `max_render_frames` frames.
    """
    if idempotency_key is None:
        await run_in_threadpool(_check_quota, sessions, principal.tenant_id, settings)
    req = parse(RenderRequest, await read_json(request, _max_body(settings)))
    if req.callback_url is not None:
        await run_in_threadpool(require_callback_url, req.callback_url, settings)
    idempotent = IdempotentRequest(sessions, principal.tenant_id, idempotency_key, settings)
    digest = hashlib.sha256(req.model_dump_json().encode()).hexdigest()
    replay = await idempotent.replay(
        request, {"body_sha256": digest}, {}, lambda body: f"/v1/jobs/{body['id']}"
    )
    if replay is not None:
        return replay
    job_id = new_id()
    inputs = store.job_input_dir(principal.tenant_id, job_id)
    try:
        resolved = await run_in_threadpool(
            _resolve_in_session, sessions, req, principal, store, settings, avatar_id
        )
        await run_in_threadpool(_store_poses, store, inputs, resolved.poses)
        job = await run_in_threadpool(
            _create, sessions, principal, job_id, avatar_id, req, resolved, settings
        )
        try:
            await run_in_threadpool(queue.enqueue, REENACT_TASK, job.id)
        except Exception as exc:
            logger.warning("enqueue of job %s failed: %s", job.id, exc)
            await run_in_threadpool(_forget, sessions, job.id)
            raise unavailable(
                "queue_unavailable", "the job queue is unavailable", settings.retry_after_s
            ) from None
    except BaseException:
        shutil.rmtree(store.job_dir(principal.tenant_id, job_id), ignore_errors=True)
        await idempotent.failed()
        raise
    created = JobOut.of(job, signer)
    await idempotent.done(ACCEPTED, created)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return created


def _check_quota(sessions: sessionmaker[Session], tenant_id: str, settings: Settings) -> None:
    with session_scope(sessions) as session:
        check_job_quota(session, tenant_id, settings)
