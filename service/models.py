"""The service's tables (SQLAlchemy 2 typed ORM): tenants, API keys, avatars, pose tracks, jobs,
webhook deliveries and idempotency records. Every row a client can see carries its tenant id.

A change here needs a new revision in service/migrations/versions (tests compare the two).
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy import Enum as SqlEnum
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so later migrations can drop or alter them by name.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def new_id() -> str:
    """A random UUID4 string: ids are unguessable and can be made before the insert."""
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite would hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use datetime.now(UTC)")
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


JsonType = JSON().with_variant(JSONB(), "postgresql")


def _enum(cls: type[enum.Enum], name: str) -> SqlEnum:
    """Store an enum as its lowercase value in a VARCHAR: new values need no ALTER TYPE."""
    return SqlEnum(
        cls,
        name=name,
        native_enum=False,
        length=16,
        values_callable=lambda members: [m.value for m in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# --- enums -----------------------------------------------------------------------------------


class JobStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


class JobKind(enum.StrEnum):
    # Values are VARCHAR(16) without a CHECK constraint: a new one needs no migration.
    PREPROCESS = "preprocess"  # a zero-shot avatar: photos -> crops -> identity embedding
    FINETUNE = "finetune"  # preprocess, then fine-tune (one job, two stages)
    REENACT = "reenact"  # a driver video or a stored pose track -> the avatar performing it
    POSE_TRACK = "pose_track"  # a driver video -> its per-frame pose descriptors, stored
    RENDER = "render"  # explicit poses (list, keyframes, retimed track) -> the avatar


# Jobs of these kinds write result files to their job folder (downloads, retention).
RESULT_KINDS = frozenset({JobKind.REENACT, JobKind.RENDER})


class FineTune(enum.StrEnum):
    """How much of the generator an avatar adapts (paper Sec. 3.3): none is zero-shot."""

    NONE = "none"
    LIGHT = "light"
    FULL = "full"


class AvatarStatus(enum.StrEnum):
    PENDING = "pending"  # photos stored, identity not embedded yet
    TRAINING = "training"  # a fine-tune job is running
    READY = "ready"
    FAILED = "failed"


class PoseTrackStatus(enum.StrEnum):
    PENDING = "pending"  # its job has not stored the descriptors yet
    READY = "ready"
    FAILED = "failed"  # its job failed or was canceled
    EXPIRED = "expired"  # past `pose_track_ttl_s`: the files are gone, the row stays


# --- tables ----------------------------------------------------------------------------------


class Tenant(Base):
    """An account: the unit of isolation; everything below belongs to exactly one."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiKey(Base):
    """A bearer key `lpd_<prefix>_<secret>`: the prefix finds the row, the secret's sha256
    proves it. The secret itself is never stored."""

    __tablename__ = "api_keys"
    __table_args__ = (Index("ix_api_keys_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100))
    rate_limit_per_minute: Mapped[int | None] = mapped_column(Integer)  # None: the default
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Avatar(Base):
    """A person made from uploaded photos: an identity embedding and, if fine-tuned, weights."""

    __tablename__ = "avatars"
    __table_args__ = (Index("ix_avatars_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[AvatarStatus] = mapped_column(
        _enum(AvatarStatus, "avatar_status"), default=AvatarStatus.PENDING
    )
    fine_tune: Mapped[FineTune] = mapped_column(_enum(FineTune, "fine_tune"), default=FineTune.NONE)
    identity_embedding: Mapped[bytes | None] = mapped_column(LargeBinary)  # float32 (D_id,)
    artifact_path: Mapped[str | None] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class PoseTrack(Base):
    """A driver performance stored as per-frame pose descriptors (paper Sec. 3: identity-free
    latent pose vectors), reusable to drive any avatar without decoding the video again.

    Its files (descriptors, crop boxes, audio, and the video itself when kept for paste-back)
    live under the artifact store's `pose_tracks/<id>/`; the row holds what clients query.
    """

    __tablename__ = "pose_tracks"
    __table_args__ = (Index("ix_pose_tracks_tenant_created", "tenant_id", "created_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[PoseTrackStatus] = mapped_column(
        _enum(PoseTrackStatus, "pose_track_status"), default=PoseTrackStatus.PENDING
    )
    job_id: Mapped[str | None] = mapped_column(String(36))  # the job that encodes it
    frames: Mapped[int | None] = mapped_column(Integer)
    fps: Mapped[float | None] = mapped_column(Float)
    duration_s: Mapped[float | None] = mapped_column(Float)
    dim: Mapped[int | None] = mapped_column(Integer)  # D_pose
    face_frames: Mapped[int | None] = mapped_column(Integer)  # frames with a detected face
    width: Mapped[int | None] = mapped_column(Integer)  # of the driver video
    height: Mapped[int | None] = mapped_column(Integer)
    audio: Mapped[bool] = mapped_column(Boolean, default=False)
    keep_video: Mapped[bool] = mapped_column(Boolean, default=True)  # for paste-back
    encoder: Mapped[str | None] = mapped_column(String(64))  # pose encoder fingerprint
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)


class Job(Base):
    """A fine-tune, reenactment, pose-track or render run. `status` only moves through
    service.jobs.transition."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_tenant_created", "tenant_id", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    kind: Mapped[JobKind] = mapped_column(_enum(JobKind, "job_kind"))
    status: Mapped[JobStatus] = mapped_column(
        _enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    progress: Mapped[float] = mapped_column(Float, default=0.0)  # 0..1
    stage: Mapped[str | None] = mapped_column(String(64))
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    error_retryable: Mapped[bool | None] = mapped_column(Boolean)
    params: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    result: Mapped[dict[str, Any] | None] = mapped_column(JsonType)
    avatar_id: Mapped[str | None] = mapped_column(ForeignKey("avatars.id", ondelete="SET NULL"))
    # The track a job makes (kind pose_track) or is driven by (reenact from a track).
    pose_track_id: Mapped[str | None] = mapped_column(
        ForeignKey("pose_tracks.id", ondelete="SET NULL"), index=True
    )
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # times a worker started it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, onupdate=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class WebhookDelivery(Base):
    """One event POSTed to a job's callback_url, with its retry state (the outbox row)."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        Index("ix_webhook_deliveries_job", "job_id"),
        Index("ix_webhook_deliveries_due", "delivered_at", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    event: Mapped[str] = mapped_column(String(64))  # e.g. "job.succeeded"
    url: Mapped[str] = mapped_column(String(2048))
    status_code: Mapped[int | None] = mapped_column(Integer)  # of the last attempt
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class IdempotencyRecord(Base):
    """The first response to a POST with an Idempotency-Key, replayed for retries of it.

    `request_sha256` catches a key reused with a different request; a NULL response_status
    means the first request is still in flight.
    """

    __tablename__ = "idempotency_records"
    __table_args__ = (
        UniqueConstraint("tenant_id", "key"),
        Index("ix_idempotency_records_tenant_created", "tenant_id", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    request_sha256: Mapped[str] = mapped_column(String(64))
    response_status: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[Any | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
