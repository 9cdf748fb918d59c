"""Request and response models of the avatar, reenactment and job routes, with OpenAPI
examples."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from service.models import Avatar, AvatarStatus, FineTune, Job, JobKind, JobStatus
from service.signing import UrlSigner

T = TypeVar("T")

_AVATAR_ID: Final = "0b6f2c3e-8a41-4c55-9d1e-2f7a9b3c4d5e"
_JOB_ID: Final = "5d9e7f1a-3b2c-4d8e-a6f0-1c2b3a4d5e6f"
_TIME: Final = "2026-11-26T10:00:00Z"


class AvatarOptions(BaseModel):
    """The form fields of `POST /v1/avatars` besides the photos."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field("avatar", min_length=1, max_length=200, description="A label for people.")
    fine_tune: FineTune = Field(
        FineTune.NONE,
        description="`none`: zero-shot only (identity embedding). `light`: tune the embedding "
        "and the AdaIN MLP's input layer (small artifact). `full`: tune the generator.",
    )
    steps: int | None = Field(
        None, ge=1, description="Fine-tune steps; default grows with the number of photos."
    )
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="Receives a signed POST when the job finishes (see Webhooks).",
    )

    @field_validator("name")
    @classmethod
    def _strip(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name is blank")
        return v.strip()


class JobError(BaseModel):
    code: str = Field(description="Stable reason, e.g. `no_face`.")
    message: str
    retryable: bool = Field(description="Whether the same request may succeed if sent again.")


class JobLinks(BaseModel):
    avatar: str | None = Field(default=None, description="The avatar this job made or updated.")
    preview: str | None = Field(
        default=None, description="PNG: photos above their reconstructions."
    )
    video: str | None = Field(
        default=None, description="The reenacted video (needs the API key; supports HTTP Range)."
    )
    mask: str | None = Field(
        default=None, description="The matte: a grey MP4 of the avatar's mask."
    )
    video_url: str | None = Field(
        default=None,
        description="A signed link to `video` that needs no API key, until `expires_at`.",
    )
    mask_url: str | None = Field(default=None, description="A signed link to `mask`.")
    expires_at: datetime | None = Field(default=None, description="When the signed links expire.")
    expired: bool = Field(
        default=False, description="The result files were deleted after the retention period."
    )
    frames: int | None = Field(default=None, description="Frames rendered (one per driver frame).")
    fps: float | None = Field(default=None, description="Frame rate of the result (the driver's).")
    audio: bool | None = Field(default=None, description="Whether the driver's audio was kept.")


class JobOut(BaseModel):
    """A job's state as a client sees it."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID,
                    "kind": "finetune",
                    "status": "running",
                    "progress": 0.42,
                    "stage": "finetune",
                    "avatar_id": _AVATAR_ID,
                    "attempts": 1,
                    "created_at": _TIME,
                    "updated_at": _TIME,
                    "started_at": _TIME,
                    "finished_at": None,
                    "result": None,
                    "error": None,
                }
            ]
        }
    )

    id: str
    kind: JobKind
    status: JobStatus
    progress: float = Field(ge=0, le=1)
    stage: str | None
    avatar_id: str | None
    attempts: int = Field(description="Times a worker started it (retries and takeovers).")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    result: JobLinks | None = None
    error: JobError | None = None

    @classmethod
    def of(cls, job: Job, signer: UrlSigner | None = None) -> JobOut:
        """The job as clients see it; `signer` adds signed links to result files."""
        error = None
        if job.error_code is not None:
            error = JobError(
                code=job.error_code,
                message=job.error_message or "",
                retryable=bool(job.error_retryable),
            )
        result = None
        if job.status is JobStatus.SUCCEEDED and job.kind is JobKind.REENACT:
            result = _reenact_links(job, signer)
        elif job.status is JobStatus.SUCCEEDED and job.avatar_id is not None:
            preview = bool((job.result or {}).get("preview"))
            result = JobLinks(
                avatar=f"/v1/avatars/{job.avatar_id}",
                preview=f"/v1/avatars/{job.avatar_id}/preview" if preview else None,
            )
        return cls(
            id=job.id,
            kind=job.kind,
            status=job.status,
            progress=job.progress,
            stage=job.stage,
            avatar_id=job.avatar_id,
            attempts=job.attempts,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            result=result,
            error=error,
        )


def _reenact_links(job: Job, signer: UrlSigner | None) -> JobLinks:
    info = job.result or {}
    files: dict[str, str] = info.get("files", {})
    expired = bool(info.get("expired"))
    links: dict[str, object] = {
        "avatar": f"/v1/avatars/{job.avatar_id}" if job.avatar_id else None,
        "expired": expired,
        "frames": info.get("frames"),
        "fps": info.get("fps"),
        "audio": info.get("audio"),
    }
    for name in files if not expired else ():
        links[name] = f"/v1/jobs/{job.id}/files/{name}"
        if signer is not None:
            links[f"{name}_url"], expires = signer.sign(job.id, name)
            links["expires_at"] = datetime.fromtimestamp(expires, UTC)
    return JobLinks.model_validate(links)


class AvatarOut(BaseModel):
    """An avatar: usable once `status` is `ready` (zero-shot); `fine_tuned` says whether its
    own weights have replaced the zero-shot embedding."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _AVATAR_ID,
                    "name": "Ada",
                    "status": "ready",
                    "fine_tune": "light",
                    "fine_tuned": False,
                    "job_id": _JOB_ID,
                    "preview": None,
                    "created_at": _TIME,
                    "updated_at": _TIME,
                }
            ]
        }
    )

    id: str
    name: str
    status: AvatarStatus
    fine_tune: FineTune = Field(description="The fine-tuning asked for.")
    fine_tuned: bool = Field(description="True once fine-tuned weights are in use.")
    job_id: str | None = Field(description="The latest job that works on this avatar.")
    preview: str | None = Field(None, description="Link to the fine-tune preview PNG.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, avatar: Avatar, job_id: str | None) -> AvatarOut:
        fine_tuned = avatar.artifact_path is not None
        return cls(
            id=avatar.id,
            name=avatar.name,
            status=avatar.status,
            fine_tune=avatar.fine_tune,
            fine_tuned=fine_tuned,
            job_id=job_id,
            preview=f"/v1/avatars/{avatar.id}/preview" if fine_tuned else None,
            created_at=avatar.created_at,
            updated_at=avatar.updated_at,
        )


class AvatarCreated(BaseModel):
    """202: the avatar exists; its job makes it usable."""

    avatar: AvatarOut
    job: JobOut


class Page(BaseModel, Generic[T]):
    """Newest first. Pass `next_cursor` back as `cursor` for the next page; null at the end."""

    items: list[T]
    next_cursor: str | None = None


OutputKind = Literal["mp4", "webm", "mask"]
BackgroundKind = Literal["generated", "color", "image"]
BACKGROUND_IMAGE_FIELD: Final = "background_image"
VIDEO_FIELD: Final = "video"


class ReenactOptions(BaseModel):
    """The form fields of `POST /v1/reenactments` besides the video and background image."""

    model_config = ConfigDict(extra="forbid")

    avatar_id: str = Field(description="A `ready` avatar of yours.", examples=[_AVATAR_ID])
    output: OutputKind = Field(
        "mp4",
        description="`mp4`: H.264 with the driver's audio. `webm`: VP9 with an alpha channel "
        "(the avatar's mask) and Opus audio. `mask`: only the matte, a grey MP4. Every job "
        "also returns the matte as `mask`.",
    )
    background: BackgroundKind = Field(
        "generated",
        description="Behind the avatar's head crop: `generated` (the model's own), `color` "
        "(`background_color`) or `image` (the `background_image` upload). Not with "
        "`paste_back` (the driver's frame is the background) or `webm` (alpha is).",
    )
    background_color: str = Field(
        "#00b140", pattern=r"^#[0-9a-fA-F]{6}$", description="`#rrggbb`, for `color`."
    )
    paste_back: bool = Field(
        False,
        description="Paste the avatar's head into the driver's full frames (same size as "
        "the driver) instead of returning the head crop.",
    )
    keep_audio: bool = Field(True, description="Copy the driver's audio track into the result.")
    callback_url: str | None = Field(
        None,
        max_length=2048,
        description="Receives a signed POST when the job finishes (see Webhooks).",
    )

    @model_validator(mode="after")
    def _compatible(self) -> ReenactOptions:
        if self.background != "generated" and self.paste_back:
            raise ValueError(
                "`background` needs paste_back=false: the driver frame is the background"
            )
        if self.background != "generated" and self.output != "mp4":
            raise ValueError("`background` applies to `mp4` output (webm carries alpha instead)")
        return self

    def rgb(self) -> tuple[int, int, int]:
        value = int(self.background_color[1:], 16)
        return (value >> 16) & 255, (value >> 8) & 255, value & 255
