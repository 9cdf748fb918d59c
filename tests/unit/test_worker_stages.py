"""Worker stages called directly (no broker, no Celery worker): preprocess on a real photo,
a 2-3 step fine-tune of the demo checkpoint, typed failures, idempotency, cancel, takeover of
a dead worker's job, resume from the intermediate state, and the retry policy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from model.checkpoint import read_header
from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.main import create_app
from service.models import Avatar, AvatarStatus, Job, JobStatus
from service.queue import FINETUNE_TASK, PREPROCESS_TASK
from service.storage import ArtifactStore
from tests.unit.test_avatars_api import (  # reuse the API fixtures
    RecordingQueue,
    alice,  # noqa: F401
    encode,
    face_jpeg,
    make_key,
    photos,
)
from workers import runtime
from workers.finetune import finetune_job
from workers.preprocess import preprocess_job
from workers.runtime import JobBusy, JobFailure, Reporter, WorkerContext, claim, run_task

pytestmark = pytest.mark.slow

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-64.safetensors"
IDENTITY_DIM = read_header(DEMO)[0].identity_dim


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        required_queues=(),
        base_checkpoint=DEMO,
        progress_interval_s=0.0,
        finetune_checkpoint_every=2,
        job_lease_s=60.0,
        photo_face_check=False,  # the stages' own no-face handling is what is tested
    )


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def ctx(
    settings: Settings,
    sessions: sessionmaker[Session],
    queue: RecordingQueue,
) -> WorkerContext:
    return WorkerContext(settings, sessions, ArtifactStore(settings.artifacts_dir), queue)


@pytest.fixture
def client(settings: Settings, queue: RecordingQueue) -> Iterator[TestClient]:
    app = create_app(settings)
    app.state.queue = queue
    with TestClient(app) as c:
        yield c


def create(client: TestClient, headers: dict[str, str], *blobs: bytes, **fields: Any) -> str:
    data = {k: str(v) for k, v in fields.items()}
    r = client.post("/v1/avatars", files=photos(*blobs), data=data, headers=headers)
    assert r.status_code == 202, r.text
    return str(r.json()["job"]["id"])


def load(ctx: WorkerContext, job_id: str) -> tuple[Job, Avatar | None]:
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        avatar = session.get(Avatar, job.avatar_id) if job.avatar_id else None
        return job, avatar


def no_face_jpeg() -> bytes:
    x = np.linspace(0, 255, 256, dtype=np.uint8)
    return encode(Image.fromarray(np.dstack([np.tile(x, (256, 1))] * 3)))


# --- preprocess ------------------------------------------------------------------------------


def test_preprocess_makes_a_zero_shot_avatar(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    queue: RecordingQueue,
) -> None:
    job_id = create(client, alice, face_jpeg(), face_jpeg())
    preprocess_job(ctx, job_id)
    job, avatar = load(ctx, job_id)
    assert (job.status, job.stage, job.progress, job.attempts) == (
        JobStatus.SUCCEEDED,
        "done",
        1.0,
        1,
    )
    assert avatar is not None and avatar.status is AvatarStatus.READY
    embedding = np.frombuffer(avatar.identity_embedding or b"", "<f4")
    assert embedding.shape == (IDENTITY_DIM,) and np.isfinite(embedding).all()
    with np.load(ctx.store.crops_path(job.tenant_id, avatar.id)) as crops:
        assert crops["images"].shape == (2, 64, 64, 3) and crops["masks"].shape == (2, 64, 64)
        assert crops["masks"].max() > 200  # the astronaut is foreground
    assert queue.sent == [(PREPROCESS_TASK, job_id)]  # only the API's; no fine-tune

    # Idempotent: a redelivered message for a finished job changes nothing.
    preprocess_job(ctx, job_id)
    assert load(ctx, job_id)[0].attempts == 1


def test_no_face_fails_with_a_typed_code(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
) -> None:
    job_id = create(client, alice, face_jpeg(), no_face_jpeg())
    with pytest.raises(JobFailure) as failure:
        preprocess_job(ctx, job_id)
    assert failure.value.code == "no_face" and "photo 2 of 2" in failure.value.message
    runtime.fail(ctx, job_id, failure.value)
    job, avatar = load(ctx, job_id)
    assert (job.status, job.error_code, job.error_retryable) == (JobStatus.FAILED, "no_face", False)
    assert avatar is not None and avatar.status is AvatarStatus.FAILED
    body = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    assert body["error"] == {"code": "no_face", "message": job.error_message, "retryable": False}


def test_preprocess_embeds_through_the_configured_backend(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
) -> None:
    seen: list[tuple[int, ...]] = []

    def fake(crops: np.ndarray) -> np.ndarray:
        seen.append(crops.shape)
        return np.ones(IDENTITY_DIM, np.float32)

    job_id = create(client, alice, face_jpeg())
    preprocess_job(ctx, job_id, embed=fake)
    assert seen == [(1, 64, 64, 3)]
    assert (
        np.frombuffer(load(ctx, job_id)[1].identity_embedding or b"", "<f4").sum() == IDENTITY_DIM
    )  # type: ignore[union-attr]


# --- fine-tune -------------------------------------------------------------------------------


def test_light_finetune_replaces_the_zero_shot_avatar(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    queue: RecordingQueue,
) -> None:
    job_id = create(client, alice, face_jpeg(), fine_tune="light", steps=2)
    preprocess_job(ctx, job_id)
    job, avatar = load(ctx, job_id)
    # Usable zero-shot while the fine-tune waits for a GPU worker.
    assert (job.status, job.stage, job.progress) == (JobStatus.QUEUED, "finetune_queued", 0.1)
    assert (
        avatar is not None and avatar.status is AvatarStatus.READY and avatar.artifact_path is None
    )
    assert queue.sent[-1] == (FINETUNE_TASK, job_id)
    # A redelivered preprocess message only hands the job on again.
    preprocess_job(ctx, job_id)
    assert queue.sent[-1] == (FINETUNE_TASK, job_id) and load(ctx, job_id)[0].attempts == 1

    finetune_job(ctx, job_id)
    job, avatar = load(ctx, job_id)
    assert (job.status, job.progress, job.attempts) == (JobStatus.SUCCEEDED, 1.0, 2)
    assert (
        job.result is not None and job.result["steps"] == 2 and job.result["resumed_from_step"] == 0
    )
    assert avatar is not None and avatar.artifact_path == job.result["artifact"]
    artifact = ctx.store.resolve(avatar.artifact_path)
    assert artifact.is_file() and artifact.with_suffix(".png").is_file()
    assert not artifact.with_name(artifact.stem + ".work").exists()

    body = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    links = {k: v for k, v in body["result"].items() if v not in (None, False)}
    assert links == {
        "avatar": f"/v1/avatars/{avatar.id}",
        "preview": f"/v1/avatars/{avatar.id}/preview",
    }
    shown = client.get(f"/v1/avatars/{avatar.id}", headers=alice).json()
    assert shown["fine_tuned"] is True and shown["status"] == "ready"
    preview = client.get(f"/v1/avatars/{avatar.id}/preview", headers=alice)
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")

    finetune_job(ctx, job_id)  # a duplicate delivery of a finished job: nothing happens
    assert load(ctx, job_id)[0].attempts == 2

    # Deleting the avatar removes its weights, preview and crops.
    assert client.delete(f"/v1/avatars/{avatar.id}", headers=alice).status_code == 204
    assert not ctx.store.avatar_dir(job.tenant_id, avatar.id).exists()


def test_cancel_stops_a_running_finetune(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = create(client, alice, face_jpeg(), fine_tune="light", steps=3)
    preprocess_job(ctx, job_id)
    real = runtime.set_progress
    calls = 0

    def cancel_on_first_step(
        session: Session, jid: str, progress: float, stage: str | None = None
    ) -> bool:
        nonlocal calls
        calls += 1
        if calls == 2:  # after the claim's first write: the user cancels mid-run
            assert client.post(f"/v1/jobs/{jid}/cancel", headers=alice).status_code == 200
        return real(session, jid, progress, stage)

    monkeypatch.setattr(runtime, "set_progress", cancel_on_first_step)
    finetune_job(ctx, job_id)
    job, avatar = load(ctx, job_id)
    assert job.status is JobStatus.CANCELED and job.result is None
    assert avatar is not None and avatar.status is AvatarStatus.READY  # zero-shot stays usable
    out = ctx.store.finetune_path(job.tenant_id, avatar.id, job_id)
    assert not out.exists() and not out.with_name(out.stem + ".work").exists()


def test_a_dead_workers_finetune_resumes_from_its_state(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = create(client, alice, face_jpeg(), fine_tune="light", steps=3)
    preprocess_job(ctx, job_id)

    class Killed(BaseException):
        """Stands for SIGKILL: nothing in the task gets to clean up."""

    def die_at_step_3(
        self: Reporter, fraction: float, stage: str | None = None, *, force: bool = False
    ) -> bool:
        if fraction == 1.0 and stage == "finetune":  # step 3, after step 2 saved its state
            raise Killed
        return real_update(self, fraction, stage, force=force)

    real_update = Reporter.update
    monkeypatch.setattr(Reporter, "update", die_at_step_3)
    with pytest.raises(Killed):
        finetune_job(ctx, job_id)
    monkeypatch.setattr(Reporter, "update", real_update)
    job, avatar = load(ctx, job_id)
    assert avatar is not None and job.status is JobStatus.RUNNING
    work = ctx.store.finetune_path(job.tenant_id, avatar.id, job_id).with_suffix(".work")
    assert (work / "state.safetensors").is_file()  # saved at step 2 (checkpoint_every=2)

    # The redelivered task: while the lease holds, the job counts as someone else's ...
    with pytest.raises(JobBusy):
        finetune_job(ctx, job_id)
    # ... once it lapses, the task takes over and continues from step 2.
    ctx.settings = ctx.settings.model_copy(update={"job_lease_s": 0.05})
    time.sleep(0.1)
    finetune_job(ctx, job_id)
    job, _ = load(ctx, job_id)
    assert job.status is JobStatus.SUCCEEDED and job.attempts == 3
    assert job.result is not None and job.result["resumed_from_step"] == 2


def test_claim_gives_up_on_a_job_that_keeps_dying(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
) -> None:
    job_id = create(client, alice, face_jpeg())
    ctx.settings = ctx.settings.model_copy(update={"job_max_attempts": 2, "job_lease_s": 0.01})
    assert claim(ctx, job_id, "preprocess") is not None
    time.sleep(0.05)
    assert claim(ctx, job_id, "preprocess") is not None  # takeover: attempt 2
    with pytest.raises(JobFailure) as failure:
        claim(ctx, job_id, "preprocess")
    assert failure.value.code == "too_many_attempts"


# --- the retry policy ------------------------------------------------------------------------


class Retry(Exception):
    pass


def fake_task(retries: int) -> Any:
    """What run_task uses of a bound Celery task: app, request.retries, retry()."""
    calls: list[dict[str, Any]] = []

    def retry(**kwargs: Any) -> Retry:
        calls.append(kwargs)
        return Retry()

    return SimpleNamespace(
        app=None, request=SimpleNamespace(retries=retries), retry=retry, calls=calls
    )


@pytest.mark.parametrize(
    ("error", "retries", "status", "code"),
    [
        (OperationalError("SELECT 1", {}, Exception("db down")), 0, JobStatus.QUEUED, None),
        (
            OperationalError("SELECT 1", {}, Exception("db down")),
            5,
            JobStatus.FAILED,
            "dependency_unavailable",
        ),
        (JobFailure("no_face", "no face"), 0, JobStatus.FAILED, "no_face"),
        (RuntimeError("bug"), 0, JobStatus.FAILED, "internal_error"),
    ],
)
def test_retry_policy(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    retries: int,
    status: JobStatus,
    code: str | None,
) -> None:
    job_id = create(client, alice, face_jpeg())
    monkeypatch.setattr(runtime, "default_context", lambda app: ctx)

    def body(ctx: WorkerContext, jid: str) -> None:
        assert claim(ctx, jid, "preprocess") is not None
        raise error

    task = fake_task(retries)
    if status is JobStatus.QUEUED:
        with pytest.raises(Retry):
            run_task(task, job_id, body)
        assert task.calls[0]["countdown"] == ctx.settings.task_retry_backoff_s
    else:
        run_task(task, job_id, body)
        assert task.calls == []
    job, _ = load(ctx, job_id)
    assert (job.status, job.error_code) == (status, code)


def test_busy_job_is_retried_after_the_lease(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    job_id = create(client, alice, face_jpeg())
    with session_scope(ctx.sessions) as session:
        transition(session, job_id, JobStatus.RUNNING)  # another worker, alive
    monkeypatch.setattr(runtime, "default_context", lambda app: ctx)
    task = fake_task(0)
    with pytest.raises(Retry):
        run_task(task, job_id, preprocess_job)
    assert task.calls == [{"countdown": ctx.settings.job_lease_s}]


def test_other_tenants_jobs_stay_invisible_after_processing(
    ctx: WorkerContext,
    client: TestClient,
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
) -> None:
    bob = make_key(sessions, "bob")
    job_id = create(client, alice, face_jpeg())
    preprocess_job(ctx, job_id)
    assert client.get(f"/v1/jobs/{job_id}", headers=bob).status_code == 404
