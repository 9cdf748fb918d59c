"""Result downloads: with the API key (`/v1/jobs/{id}/files/{name}`) or through an expiring
signed link (`/v1/files/{id}/{name}?expires=...&signature=...`, see service.signing).

Both stream the file with HTTP Range support (Starlette's FileResponse), so players can seek
and interrupted downloads resume; with `storage=s3` both answer 307 to a presigned URL of the
bucket's copy, which serves Range requests itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Final, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse, RedirectResponse
from sqlalchemy.orm import Session

from service.api.deps import PrincipalDep, SessionDep, SignerDep, StoreDep
from service.api.routes.jobs import get_job_or_404
from service.errors import ApiError, error_example
from service.models import RESULT_KINDS, Job, JobKind, JobStatus
from service.signing import InvalidSignature
from service.storage import ArtifactStore

router = APIRouter(tags=["results"])

FileName = Literal["video", "mask", "zip"]
MEDIA_TYPES: Final = {".mp4": "video/mp4", ".webm": "video/webm", ".zip": "application/zip"}
VIDEO_CONTENT: Final[dict[str, dict[str, str]]] = {"video/mp4": {}, "video/webm": {}}
REDIRECT: Final = {"description": "With storage=s3: `Location` is a presigned URL of the file."}


def result_file(store: ArtifactStore, job: Job, name: str) -> Path:
    """The stored result `name` of a finished reenactment or render (maybe only in the
    bucket), or a typed 404/409/410."""
    if job.kind not in RESULT_KINDS:
        raise ApiError(404, "not_found", "this job has no result files")
    if job.status is not JobStatus.SUCCEEDED:
        raise ApiError(
            409, "job_not_finished", f"the job is {job.status.value}", {"status": job.status}
        )
    info = job.result or {}
    if info.get("expired"):
        raise ApiError(410, "result_expired", "the result was deleted after its retention period")
    stored = info.get("files", {}).get(name)
    if stored is None:
        raise ApiError(404, "not_found", f"this job has no `{name}` file")
    return store.job_dir(job.tenant_id, job.id) / Path(stored).name


def _download(store: ArtifactStore, path: Path, job: Job) -> Response:
    media_type = MEDIA_TYPES.get(path.suffix, "application/octet-stream")
    prefix = "render" if job.kind is JobKind.RENDER else "reenactment"
    filename = f"{prefix}-{job.id}{path.suffix}"
    url = store.download_url(path, filename, media_type)
    if url is not None:  # the bucket serves it: no bytes through the API
        return RedirectResponse(url, status_code=307)
    if not path.is_file():
        raise ApiError(410, "result_expired", "the result file is gone")
    return FileResponse(
        path, media_type=media_type, filename=filename, content_disposition_type="inline"
    )


@router.get(
    "/v1/jobs/{job_id}/files/{name}",
    summary="Download a result file",
    response_class=FileResponse,
    responses={
        200: {"content": VIDEO_CONTENT},
        206: {"description": "Partial content (Range request).", "content": VIDEO_CONTENT},
        307: REDIRECT,
        404: error_example("not_found", "no such job"),
        409: error_example("job_not_finished", "the job is running", {"status": "running"}),
        410: error_example("result_expired", "the result was deleted after its retention period"),
    },
)
def download(
    job_id: str, name: FileName, principal: PrincipalDep, session: SessionDep, store: StoreDep
) -> Response:
    """`video` (the reenactment, as asked: MP4 or WebM), `mask` (the matte, grey MP4) or
    `zip` (a render's PNG frames)."""
    job = get_job_or_404(session, principal, job_id)
    return _download(store, result_file(store, job, name), job)


@router.get(
    "/v1/files/{job_id}/{name}",
    summary="Download a result file through a signed link",
    response_class=FileResponse,
    responses={
        200: {"content": VIDEO_CONTENT},
        307: REDIRECT,
        403: error_example("invalid_signature", "the link has expired"),
        410: error_example("result_expired", "the result was deleted after its retention period"),
    },
)
def download_signed(
    job_id: str,
    name: FileName,
    expires: Annotated[int, Query(description="Unix time the link expires.")],
    signature: Annotated[str, Query(pattern=r"^[0-9a-f]{64}$", description="Hex HMAC-SHA256.")],
    session: SessionDep,
    store: StoreDep,
    signer: SignerDep,
) -> Response:
    """The links in a job's `result.*_url`: no API key needed until they expire."""
    if signer is None:
        raise ApiError(404, "not_found", "signed links are not enabled")
    try:
        signer.verify(job_id, name, expires, signature)
    except InvalidSignature as exc:
        raise ApiError(403, "invalid_signature", str(exc)) from None
    job = _job(session, job_id)
    return _download(store, result_file(store, job, name), job)


def _job(session: Session, job_id: str) -> Job:
    job = session.get(Job, job_id)
    if job is None:  # a genuine link to a deleted job
        raise ApiError(410, "result_expired", "the job no longer exists")
    return job
