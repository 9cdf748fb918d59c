"""Service and worker settings: one `Settings` object read from `LPD_*` environment variables.

Nothing else in service/ or workers/ reads os.environ; code gets a `Settings` by injection
(FastAPI Depends, task arguments) or from the cached `get_settings()`.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MiB = 1024 * 1024
# Request-scoped database sessions open at once per API process (service.api.deps); the
# connection pool must hold more than this, so single-turn sessions always find one.
MAX_REQUEST_SESSIONS = 20

QueueName = Literal["preprocess", "finetune", "reenact", "events"]


class Settings(BaseSettings):
    """Every knob of the API and workers, with defaults that run on one machine."""

    model_config = SettingsConfigDict(env_prefix="LPD_", extra="ignore", frozen=True)

    # --- dependencies --------------------------------------------------------------------
    database_url: str = Field(
        default="sqlite:///artifacts/lpd.db",
        description="SQLAlchemy URL. SQLite (embedded default, relative to the working "
        "directory) or PostgreSQL (`postgresql://` is run with psycopg 3).",
    )
    db_pool_size: int = Field(
        default=10, ge=1, description="Database connections kept open per process."
    )
    db_max_overflow: int = Field(
        default=30,
        ge=0,
        description="Extra connections under load. Pool size + overflow must exceed "
        f"{MAX_REQUEST_SESSIONS} (request sessions open at once in an API process).",
    )
    redis_url: str = Field(
        default="redis://127.0.0.1:6379/0", description="Celery broker and result backend."
    )
    triton_url: str = Field(
        default="127.0.0.1:8001", description="Triton host:port (gRPC by default)."
    )
    triton_protocol: Literal["grpc", "http"] = Field(
        default="grpc", description="How to reach Triton."
    )
    triton_timeout_s: float = Field(
        default=10.0, gt=0, description="Per-attempt inference timeout."
    )
    readiness_timeout_s: float = Field(
        default=2.0,
        gt=0,
        description="Budget of each /readyz check, so a hung dependency reads as down.",
    )
    retry_after_s: int = Field(
        default=5, ge=1, description="Retry-After sent with 503 when a dependency is down."
    )

    # --- storage -------------------------------------------------------------------------
    artifacts_dir: Path = Field(
        default=Path("artifacts"),
        description="Photos, crops and fine-tuned weights by tenant and avatar id (never by "
        "client filenames); rendered videos.",
    )
    served_avatars_dir: Path = Field(
        default=Path("artifacts/served-avatars"),
        description="Where workers publish fine-tuned avatars as `<key>.safetensors` for "
        "Triton to load: the same directory as the Triton repository's `--avatar-dir` (a "
        "shared volume when they run on different hosts).",
    )
    job_result_ttl_s: int = Field(
        default=7 * 24 * 3600, gt=0, description="How long finished jobs' result files are kept."
    )
    pose_track_ttl_s: int = Field(
        default=30 * 24 * 3600,
        gt=0,
        description="How long a pose track's files (descriptors, audio, driver video) are kept "
        "after it is created; then it reads `expired`.",
    )

    # --- storage: an S3-compatible bucket (optional) -------------------------------------
    storage: Literal["local", "s3"] = Field(
        default="local",
        description="Where artifacts live: `local` (artifacts_dir is the store: a shared volume "
        "when the API and workers run on different hosts) or `s3` (the bucket is; artifacts_dir "
        "is each host's working copy). S3 credentials come from the standard AWS chain.",
    )
    s3_bucket: str = Field(default="", description="The bucket, with storage=s3.")
    s3_prefix: str = Field(default="lpd/", description="Key prefix of every object.")
    s3_endpoint_url: str | None = Field(
        default=None,
        description="None: AWS. Set for MinIO, Ceph, R2... (addressed path-style).",
    )
    s3_region: str | None = Field(
        default=None, description="The bucket's region; None: the AWS config chain's."
    )
    s3_presign_ttl_s: int = Field(
        default=3600,
        gt=0,
        le=7 * 24 * 3600,  # SigV4's limit
        description="Lifetime of the presigned URL a download redirects to; a player seeks "
        "with Range requests on it, so it must outlast watching the video.",
    )

    # --- upload limits (rejected with 4xx before any work is queued) ----------------------
    max_photos: int = Field(
        default=32, ge=1, description="Photos per avatar (the paper uses 1-32)."
    )
    max_photo_bytes: int = Field(default=20 * MiB, gt=0, description="Size of one uploaded photo.")
    max_photo_pixels: int = Field(
        default=40_000_000,
        gt=0,
        description="Width x height of one photo; guards decompression bombs.",
    )
    photo_face_check: bool = Field(
        default=True,
        description="Detect faces at upload: a photo without exactly one person is refused "
        "at once (422 `no_face`/`multiple_faces`) instead of failing the job later.",
    )
    max_video_bytes: int = Field(default=500 * MiB, gt=0, description="Size of a driving video.")
    max_video_duration_s: float = Field(
        default=300.0, gt=0, description="Length of a driving video."
    )
    max_video_resolution: int = Field(
        default=1920, gt=0, description="Longer side of a driving video, in pixels."
    )
    max_video_fps: float = Field(default=60.0, gt=0, description="Frame rate of a driving video.")
    max_background_bytes: int = Field(
        default=20 * MiB, gt=0, description="Size of an uploaded background image."
    )
    max_render_frames: int = Field(
        default=3000,
        ge=1,
        description="Frames of one pose-space render (`POST /v1/avatars/{id}/render`): explicit "
        "poses, keyframes and retimed tracks alike.",
    )
    max_batch_avatars: int = Field(
        default=20,
        ge=1,
        description="Avatars one `POST /v1/reenactments/batch` may drive with a pose track.",
    )

    # --- workers (Celery) -----------------------------------------------------------------
    required_queues: tuple[QueueName, ...] = Field(
        default=("preprocess", "finetune", "reenact"),
        description="Queues that need at least one worker for /readyz to pass; a deployment "
        "without GPU workers drops `finetune`/`reenact`, one that sends webhooks adds "
        "`events` (JSON list in the environment).",
    )
    broker_timeout_s: float = Field(
        default=5.0, gt=0, description="Connect/socket timeout for the broker when publishing."
    )
    broker_visibility_timeout_s: int = Field(
        default=7200,
        ge=1,
        description="An unacknowledged task (its worker died) is redelivered after this. Keep it "
        "above the longest task time limit, or a slow task is handed to a second worker.",
    )
    preprocess_time_limit_s: int = Field(
        default=600, ge=1, description="Hard time limit of a preprocess task (prefork pool)."
    )
    finetune_time_limit_s: int = Field(
        default=3600, ge=1, description="Hard time limit of a fine-tune task (prefork pool)."
    )
    reenact_time_limit_s: int = Field(
        default=3600, ge=1, description="Hard time limit of a reenactment task (prefork pool)."
    )
    task_max_retries: int = Field(
        default=5, ge=0, description="Retries of a task after a transient error (DB, Redis)."
    )
    task_retry_backoff_s: float = Field(
        default=5.0, gt=0, description="First retry delay after a transient error; doubles."
    )
    job_max_attempts: int = Field(
        default=10,
        ge=2,
        description="Worker starts of one job (both stages, retries, takeovers) before it is "
        "failed: a job that keeps killing its worker must not loop forever.",
    )
    job_lease_s: float = Field(
        default=300.0,
        gt=0,
        description="A running job whose last progress write is older than this is taken over "
        "by a redelivered task (its worker is presumed dead).",
    )
    progress_interval_s: float = Field(
        default=1.0, ge=0, description="Least time between two progress writes of a task."
    )

    # --- models --------------------------------------------------------------------------
    base_checkpoint: Path = Field(
        default=Path("checkpoints/demo-tiny-64.safetensors"),
        description="The shared checkpoint: crop size, zero-shot identity, fine-tune start.",
    )
    identity_backend: Literal["local", "triton"] = Field(
        default="local",
        description="Where preprocessing embeds identities: in-process PyTorch or Triton.",
    )
    reenact_batch: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Driver frames per Triton request of a reenactment job: larger batches "
        "use a GPU better, smaller ones report progress and notice a cancel sooner.",
    )
    finetune_device: str = Field(default="cpu", description="Torch device of fine-tuning.")
    finetune_checkpoint_every: int = Field(
        default=25, ge=1, description="Fine-tune steps between intermediate (resumable) states."
    )
    max_finetune_steps: int = Field(
        default=1000, ge=1, description="Upper bound on the `steps` a client may ask for."
    )
    vgg19_weights: Path | None = Field(
        default=None, description="VGG19 weights; enables the perceptual loss in fine-tuning."
    )
    vggface_weights: Path | None = Field(
        default=None, description="VGGFace weights; enables the face perceptual loss."
    )

    # --- real-time stream (WS /v1/avatars/{id}/stream) -----------------------------------
    max_stream_frame_bytes: int = Field(
        default=2 * MiB, gt=0, description="Size of one JPEG frame a stream client sends."
    )
    max_stream_frame_pixels: int = Field(
        default=3840 * 2160,
        gt=0,
        description="Width x height of one stream frame (4K); guards decompression bombs.",
    )
    stream_jpeg_quality: int = Field(
        default=85, ge=1, le=95, description="JPEG quality of the frames a stream sends back."
    )
    max_streams_per_tenant: int = Field(
        default=4,
        ge=1,
        description="Open streams per tenant in one API process; one more is closed with 4429.",
    )
    stream_idle_timeout_s: float = Field(
        default=30.0, gt=0, description="A stream with no client message for this long is closed."
    )
    pose_encoder_dir: Path | None = Field(
        default=None,
        description="The pose encoder's ONNX files for pose-only stream clients "
        "(`GET /v1/models/pose-encoder/*.onnx`), exported from `base_checkpoint` on the first "
        "download into `<dir>/<version>/` (in a subprocess: torch stays out of the API) or "
        "beforehand by `python -m service.pose_encoder`. None: `<artifacts_dir>/pose-encoder`.",
    )
    pose_encoder_export_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest the pose encoder's ONNX export may take."
    )

    # --- abuse control -------------------------------------------------------------------
    rate_limit_per_minute: int = Field(
        default=120,
        ge=1,
        description="Requests per minute per API key, unless the key overrides it.",
    )
    rate_limit_fail_open: bool = Field(
        default=True,
        description="Let requests through unlimited while Redis is unreachable (logged), "
        "rather than fail every call with 503: the limiter guards capacity, and a Redis "
        "outage alone must not take the API down.",
    )
    rate_limit_key_prefix: str = Field(
        default="lpd:ratelimit:", description="Redis key prefix of the limiter's per-key state."
    )
    rate_limit_recheck_s: float = Field(
        default=5.0,
        gt=0,
        description="After a Redis error the limiter skips Redis this long, so that a hung "
        "Redis doesn't add a socket timeout to every request.",
    )
    max_avatars_per_tenant: int = Field(
        default=100, ge=0, description="Stored avatars per tenant (failed ones count too)."
    )
    max_pose_tracks_per_tenant: int = Field(
        default=100, ge=0, description="Stored pose tracks per tenant (failed ones count too)."
    )
    max_active_jobs_per_tenant: int = Field(
        default=10, ge=0, description="Queued plus running jobs per tenant, of every kind."
    )
    quota_retry_after_s: int = Field(
        default=30,
        ge=1,
        description="Retry-After sent with 429 `quota_exceeded` for active jobs (they finish).",
    )
    idempotency_ttl_s: int = Field(
        default=24 * 3600,
        gt=0,
        description="How long a POST's response is replayed for its Idempotency-Key; older "
        "records count as absent (and may be purged).",
    )
    idempotency_stale_s: float = Field(
        default=300.0,
        gt=0,
        description="A first request still in flight after this is presumed dead (its API "
        "process crashed): a retry takes its key over instead of getting 409.",
    )

    # --- result links and webhooks -------------------------------------------------------
    signed_url_secret: SecretStr = Field(
        default=SecretStr(""),
        description="HMAC key for result download links and webhook signatures. Set it in "
        "production: it must be the same for the API and every worker.",
    )
    signed_url_ttl_s: int = Field(
        default=3600, gt=0, description="Lifetime of a signed result link."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, description="One webhook POST attempt.")
    webhook_max_attempts: int = Field(
        default=5,
        ge=1,
        description="Webhook attempts before a delivery is given up (with backoff).",
    )
    webhook_backoff_s: float = Field(
        default=5.0, gt=0, description="First retry delay of a webhook; doubles per attempt."
    )
    webhook_allow_private_hosts: bool = Field(
        default=False,
        description="Accept callback URLs on private, loopback or link-local addresses. Off in "
        "production: a callback must not reach the service's own network (SSRF).",
    )
    webhook_sweep_interval_s: float = Field(
        default=5.0,
        gt=0,
        description="How often beat (re)sends due webhook deliveries: those recorded by the "
        "API, and any whose publish or worker was lost.",
    )
    job_stalled_after_s: float = Field(
        default=600.0,
        gt=0,
        description="A job queued this long without a worker taking it (its message was lost, "
        "e.g. Redis restarted without persistence) is published again; checked every minute.",
    )
    cleanup_interval_s: float = Field(
        default=3600.0,
        gt=0,
        description="How often beat removes expired job results, stale uploads and old "
        "webhook deliveries.",
    )

    @model_validator(mode="after")
    def _pool_fits_requests(self) -> Settings:
        if self.db_pool_size + self.db_max_overflow <= MAX_REQUEST_SESSIONS:
            raise ValueError(
                f"db_pool_size + db_max_overflow must exceed {MAX_REQUEST_SESSIONS}, or "
                "requests can wait on each other for connections"
            )
        return self

    @model_validator(mode="after")
    def _bucket_named(self) -> Settings:
        if self.storage == "s3" and not self.s3_bucket:
            raise ValueError("storage=s3 needs s3_bucket")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
