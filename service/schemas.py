"""Request and response models of the avatar, reenactment, pose-track, render and job routes,
with OpenAPI examples."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Final, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from service.models import (
    RESULT_KINDS,
    Avatar,
    AvatarStatus,
    FineTune,
    Job,
    JobKind,
    JobStatus,
    PoseTrack,
    PoseTrackStatus,
)
from service.signing import UrlSigner

T = TypeVar("T")

_AVATAR_ID: Final = "0b6f2c3e-8a41-4c55-9d1e-2f7a9b3c4d5e"
_JOB_ID: Final = "5d9e7f1a-3b2c-4d8e-a6f0-1c2b3a4d5e6f"
_TRACK_ID: Final = "7c1d2e3f-4a5b-4c6d-8e9f-0a1b2c3d4e5f"
_TIME: Final = "2026-11-26T10:00:00Z"


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("name is blank")
    return v.strip()


# Shared request fields.
Label = Annotated[str, AfterValidator(_not_blank)]
CallbackUrl = Annotated[
    str | None,
    Field(
        max_length=2048,
        description="Receives a signed POST when the job finishes (see Webhooks).",
    ),
]


class AvatarOptions(BaseModel):
    """The form fields of `POST /v1/avatars` besides the photos."""

    model_config = ConfigDict(extra="forbid")

    name: Label = Field("avatar", min_length=1, max_length=200, description="A label for people.")
    fine_tune: FineTune = Field(
        FineTune.NONE,
        description="`none`: zero-shot only (identity embedding). `light`: tune the embedding "
        "and the AdaIN MLP's input layer (small artifact). `full`: tune the generator.",
    )
    steps: int | None = Field(
        None, ge=1, description="Fine-tune steps; default grows with the number of photos."
    )
    callback_url: CallbackUrl = None


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
    zip: str | None = Field(
        default=None, description="A render's frames as RGBA PNGs in a ZIP (`png_zip` output)."
    )
    zip_url: str | None = Field(default=None, description="A signed link to `zip`.")
    pose_track: str | None = Field(
        default=None, description="The pose track this job made or was driven by."
    )
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
        if job.status is JobStatus.SUCCEEDED and job.kind in RESULT_KINDS:
            result = _reenact_links(job, signer)
        elif job.status is JobStatus.SUCCEEDED and job.kind is JobKind.POSE_TRACK:
            info = job.result or {}
            result = JobLinks(
                pose_track=f"/v1/pose-tracks/{job.pose_track_id}" if job.pose_track_id else None,
                frames=info.get("frames"),
                fps=info.get("fps"),
                audio=info.get("audio"),
            )
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
        "pose_track": f"/v1/pose-tracks/{job.pose_track_id}" if job.pose_track_id else None,
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
    pose_track_id: str | None = Field(
        None,
        description="Drive the avatar with a stored pose track instead of uploading `video` "
        "(exactly one of the two): no decoding or pose encoding, only the generator runs.",
    )
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
    callback_url: CallbackUrl = None

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


# --- pose tracks -----------------------------------------------------------------------------


class PoseTrackOptions(BaseModel):
    """The form fields of `POST /v1/pose-tracks` besides the video."""

    model_config = ConfigDict(extra="forbid")

    name: Label = Field("pose track", min_length=1, max_length=200, description="A label.")
    keep_video: bool = Field(
        True,
        description="Keep the driver video with the track, so reenactments from it can "
        "`paste_back`; without it only the descriptors, boxes and audio are stored.",
    )
    callback_url: CallbackUrl = None


class PoseTrackOut(BaseModel):
    """A driver performance as pose descriptors: usable once `status` is `ready`."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _TRACK_ID,
                    "name": "keynote",
                    "status": "ready",
                    "job_id": _JOB_ID,
                    "frames": 250,
                    "fps": 25.0,
                    "duration_s": 10.0,
                    "dim": 256,
                    "face_frames": 248,
                    "width": 1280,
                    "height": 720,
                    "audio": True,
                    "video": True,
                    "encoder": "134a22354411023e",
                    "expires_at": _TIME,
                    "created_at": _TIME,
                    "updated_at": _TIME,
                }
            ]
        }
    )

    id: str
    name: str
    status: PoseTrackStatus
    job_id: str | None = Field(description="The job that encodes the track.")
    frames: int | None = Field(description="Descriptors stored: one per driver frame.")
    fps: float | None = Field(description="The driver's frame rate.")
    duration_s: float | None = Field(description="Seconds from the first frame to the end.")
    dim: int | None = Field(description="Floats per descriptor (D_pose, 256).")
    face_frames: int | None = Field(
        description="Frames where a face was detected; the others hold the nearest box."
    )
    width: int | None = Field(description="The driver video's size (paste-back output size).")
    height: int | None
    audio: bool = Field(description="Whether the driver's audio was stored.")
    video: bool = Field(description="Whether the driver video is kept (needed by paste_back).")
    encoder: str | None = Field(
        description="Fingerprint of the pose encoder that made the descriptors; a track is "
        "refused (409 `pose_track_stale`) once the served one differs."
    )
    expires_at: datetime | None = Field(description="When its files are deleted.")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, track: PoseTrack, status: PoseTrackStatus | None = None) -> PoseTrackOut:
        """`status`: the effective one (service.pose_tracks.effective_status), if known."""
        status = status or track.status
        return cls(
            id=track.id,
            name=track.name,
            status=status,
            job_id=track.job_id,
            frames=track.frames,
            fps=track.fps,
            duration_s=track.duration_s,
            dim=track.dim,
            face_frames=track.face_frames,
            width=track.width,
            height=track.height,
            audio=bool(track.audio) and status is not PoseTrackStatus.EXPIRED,
            video=bool(track.keep_video) and status is not PoseTrackStatus.EXPIRED,
            encoder=track.encoder,
            expires_at=track.expires_at,
            created_at=track.created_at,
            updated_at=track.updated_at,
        )


class PoseTrackCreated(BaseModel):
    """202: the track exists; its job encodes it."""

    pose_track: PoseTrackOut
    job: JobOut


class TrackReenactOptions(BaseModel):
    """How each avatar of a batch is rendered: `ReenactOptions` without the upload-only ones."""

    model_config = ConfigDict(extra="forbid")

    output: OutputKind = "mp4"
    background: Literal["generated", "color"] = "generated"
    background_color: str = Field(default="#00b140", pattern=r"^#[0-9a-fA-F]{6}$")
    paste_back: bool = False
    keep_audio: bool = True


class ReenactBatch(BaseModel):
    """`POST /v1/reenactments/batch`: one pose track drives several avatars, a job each."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "pose_track_id": _TRACK_ID,
                    "avatar_ids": [_AVATAR_ID],
                    "options": {"output": "mp4", "paste_back": False},
                }
            ]
        },
    )

    pose_track_id: str
    avatar_ids: list[str] = Field(
        min_length=1,
        max_length=1000,
        description="Distinct `ready` avatars of yours; at most `max_batch_avatars`.",
    )
    options: TrackReenactOptions = Field(default_factory=lambda: TrackReenactOptions())
    callback_url: str | None = Field(
        None, max_length=2048, description="Receives each job's event (see Webhooks)."
    )

    def job_options(self, avatar_id: str) -> ReenactOptions:
        """The options of one avatar's job (checked like a single reenactment's)."""
        return ReenactOptions(
            avatar_id=avatar_id,
            pose_track_id=self.pose_track_id,
            callback_url=self.callback_url,
            **self.options.model_dump(),
        )


class BatchCreated(BaseModel):
    """202: a queued job per avatar, in the order of `avatar_ids`."""

    jobs: list[JobOut]


# --- pose-space render -----------------------------------------------------------------------

RENDER_SOURCES: Final = ("poses", "poses_b64", "keyframes", "pose_track_id")
_RETIME_FIELDS: Final = frozenset({"speed", "start_s", "end_s", "resample"})


class Keyframe(BaseModel):
    """A pose at a time: given as floats, or taken from a frame of a stored pose track."""

    model_config = ConfigDict(extra="forbid")

    t: float = Field(ge=0, description="Seconds from the start of the render.")
    pose: list[float] | None = Field(None, description="D_pose floats.")
    pose_track_id: str | None = Field(None, description="With `frame`: that track's pose.")
    frame: int | None = Field(None, ge=0, description="A frame index of `pose_track_id`.")

    @model_validator(mode="after")
    def _one_pose(self) -> Keyframe:
        from_track = self.pose_track_id is not None or self.frame is not None
        if (self.pose is None) == (not from_track):
            raise ValueError("give `pose`, or `pose_track_id` and `frame`")
        if from_track and (self.pose_track_id is None or self.frame is None):
            raise ValueError("`pose_track_id` and `frame` go together")
        return self


class RenderRequest(BaseModel):
    """`POST /v1/avatars/{id}/render`: the avatar in poses you choose (paper Fig. 4).

    Exactly one source: `poses` (a list of D-float descriptors), `poses_b64` (the same as
    little-endian float16/float32 bytes, row after row), `keyframes` (interpolated at `fps`)
    or `pose_track_id` (a stored track, retimed and/or smoothed).
    """

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "keyframes": [
                        {"t": 0.0, "pose_track_id": _TRACK_ID, "frame": 0},
                        {"t": 2.0, "pose_track_id": _TRACK_ID, "frame": 120},
                    ],
                    "fps": 25,
                    "output": "mp4",
                },
                {"pose_track_id": _TRACK_ID, "speed": 0.5, "smooth_sigma_frames": 2},
            ]
        },
    )

    poses: list[list[float]] | None = Field(None, description="(T, D) descriptors.")
    poses_b64: str | None = Field(None, description="Base64 of (T, D) `dtype` bytes.")
    dtype: Literal["float16", "float32"] = Field("float32", description="Of `poses_b64`.")
    keyframes: list[Keyframe] | None = Field(
        None, description="Times strictly increasing, each on its own frame at `fps`."
    )
    interpolation: Literal["slerp", "linear"] = Field(
        "slerp",
        description="Between keyframes: `slerp` moves the direction along the great circle "
        "and the norm linearly; `linear` is a straight line.",
    )
    pose_track_id: str | None = Field(None, description="A ready pose track of yours.")
    speed: float = Field(1.0, gt=0, le=100, description="Track seconds per output second.")
    start_s: float = Field(0.0, ge=0, description="Where in the track to start.")
    end_s: float | None = Field(None, ge=0, description="Where to stop (default: its end).")
    resample: Literal["slerp", "nearest"] = Field(
        "slerp", description="Between track frames: slerp, or the nearest frame."
    )
    smooth_sigma_frames: float = Field(
        0.0, ge=0, le=100, description="Gaussian smoothing over time (output frames); 0: off."
    )
    fps: float | None = Field(
        None, gt=0, le=120, description="Output frame rate; default 25, or the track's."
    )
    output: Literal["mp4", "png_zip"] = Field(
        "mp4",
        description="`mp4`: H.264 crops on the generator's background, plus the matte. "
        "`png_zip`: RGBA PNG frames (alpha = the avatar's mask) in a ZIP.",
    )
    callback_url: CallbackUrl = None

    @model_validator(mode="after")
    def _one_source(self) -> RenderRequest:
        given = [name for name in RENDER_SOURCES if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(RENDER_SOURCES)}")
        if self.pose_track_id is None and (extra := _RETIME_FIELDS & self.model_fields_set):
            raise ValueError(f"{', '.join(sorted(extra))} apply to `pose_track_id` only")
        if self.keyframes is None and "interpolation" in self.model_fields_set:
            raise ValueError("`interpolation` applies to `keyframes` only")
        if "dtype" in self.model_fields_set and self.poses_b64 is None:
            raise ValueError("`dtype` applies to `poses_b64` only")
        return self

    @property
    def source(self) -> str:
        return next(name for name in RENDER_SOURCES if getattr(self, name) is not None)
