"""Avatars end to end through real Redis and a real Celery worker process.

The API runs in-process (TestClient); the worker is `python -m celery -A workers.celery_app
worker` with the same settings through LPD_* variables: SQLite and artifacts in tmp, Redis
DB 5 (flushed first), the demo checkpoint. Short lease and visibility timeout, so that a worker
killed mid fine-tune is replaced within seconds and its job resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from PIL import Image

from service.api.routes import health
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import create_db_engine, create_session_factory, migrate, session_scope
from service.main import create_app
from service.models import Avatar, Job
from service.queue import CeleryQueue, create_celery
from tests.media_samples import astronaut
from tests.unit.test_avatars_api import encode

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = "redis://127.0.0.1:6379/5"
JOB_TIMEOUT_S = 300.0  # 2 CPU cores, possibly shared with a training run


@dataclass
class Worker:
    """One `celery worker` process (its own session, so a kill takes its children too)."""

    env: dict[str, str]
    log: Path
    name: str
    queues: str = "preprocess,finetune"
    beat_schedule: Path | None = None  # run beat inside (`-B`), its state file here
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        beat = ["-B", "-s", str(self.beat_schedule)] if self.beat_schedule else []
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [  # `-m`: the repository root stays on sys.path for lazy imports
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "workers.celery_app",
                    "worker",
                    "-Q",
                    self.queues,
                    *beat,
                    "-c",
                    "1",
                    "--pool",
                    "solo",
                    "--loglevel",
                    "INFO",
                    "-n",
                    f"{self.name}@%h",
                ],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process group; SIGKILL it if it outlives 30 s."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:] if self.log.exists() else ""


@dataclass
class Stack:
    settings: Settings
    client: TestClient
    headers: dict[str, str]
    queue: CeleryQueue
    worker: Worker
    workers_started: list[Worker] = field(default_factory=list)

    def job(self, job_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/jobs/{job_id}", headers=self.headers)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def db_job(self, job_id: str) -> Job:
        engine = create_db_engine(self.settings.database_url)
        try:
            with session_scope(create_session_factory(engine)) as session:
                job = session.get(Job, job_id)
                assert job is not None
                return job
        finally:
            engine.dispose()

    def wait(
        self, job_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = JOB_TIMEOUT_S
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Poll the job until `until(job)`; returns it and every state seen on the way."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.job(job_id)
            seen.append(job)
            if until(job):
                return job, seen
            time.sleep(0.3)
        pytest.fail(f"job {job_id} stuck at {seen[-1]}\n--- worker log ---\n{self.worker.tail()}")

    def create(self, photo: bytes, **fields: Any) -> dict[str, Any]:
        data = {k: str(v) for k, v in fields.items()}
        files = [("photos", ("me.jpg", photo, "image/jpeg"))]
        r = self.client.post("/v1/avatars", files=files, data=data, headers=self.headers)
        assert r.status_code == 202, r.text
        return dict(r.json())

    def start_worker(self, name: str) -> Worker:
        worker = Worker(self.worker.env, self.worker.log, name)
        worker.start()
        self.workers_started.append(worker)
        self.worker = worker
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            try:
                if self.queue.workers_per_queue(1.0).get("finetune", 0) >= 1:
                    return worker
            except Exception:
                pass
            assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
        pytest.fail(f"worker did not come up\n{worker.tail()}")


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "canceled")


def face_photo() -> bytes:
    return encode(Image.fromarray(astronaut()))


def no_face_photo() -> bytes:
    x = np.linspace(0, 255, 256, dtype=np.uint8)
    return encode(Image.fromarray(np.dstack([np.tile(x, (256, 1))] * 3)))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    broker = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        broker.ping()
    except redis.exceptions.ConnectionError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    broker.flushdb()  # DB 5 is this test's alone

    tmp = tmp_path_factory.mktemp("workers")
    values: dict[str, Any] = {
        "database_url": f"sqlite:///{tmp / 'lpd.db'}",
        "redis_url": REDIS_URL,
        "artifacts_dir": str(tmp / "artifacts"),
        "base_checkpoint": str(ROOT / "checkpoints" / "demo-tiny-64.safetensors"),
        "required_queues": ["preprocess", "finetune"],
        "progress_interval_s": 0.2,
        "finetune_checkpoint_every": 2,
        "job_lease_s": 3.0,
        "broker_visibility_timeout_s": 4,
        "readiness_timeout_s": 2.0,
    }
    migrate(values["database_url"])
    settings = Settings(**values)
    env = {
        **os.environ,
        **{
            f"LPD_{k.upper()}": json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in values.items()
        },
    }
    engine = create_db_engine(settings.database_url)
    with session_scope(create_session_factory(engine)) as session:
        key, _ = create_api_key(session, create_tenant(session, "acme"), "it")
    engine.dispose()

    queue = CeleryQueue(create_celery(settings))
    worker = Worker(env, tmp / "worker.log", "w0")
    app = create_app(settings)
    with TestClient(app) as client:
        s = Stack(settings, client, {"Authorization": f"Bearer {key}"}, queue, worker)
        s.start_worker("w1")
        try:
            yield s
        finally:
            for w in s.workers_started:
                w.kill(signal.SIGTERM)
            queue.app.close()
            broker.flushdb()


# --- tests -----------------------------------------------------------------------------------


def test_a_photo_becomes_a_fine_tuned_avatar(stack: Stack) -> None:
    created = stack.create(face_photo(), name="astronaut", fine_tune="light", steps=3)
    job_id, avatar_id = created["job"]["id"], created["avatar"]["id"]
    _, before = stack.wait(job_id, lambda j: j["stage"] == "finetune" or finished(j))
    # Zero-shot usable while the fine-tune runs.
    avatar = stack.client.get(f"/v1/avatars/{avatar_id}", headers=stack.headers).json()
    assert (avatar["status"], avatar["fine_tuned"]) == ("ready", False), stack.worker.tail()
    job, seen = stack.wait(job_id, finished)
    seen = before + seen
    assert job["status"] == "succeeded", (job, stack.worker.tail())
    progress = [j["progress"] for j in seen]
    assert progress == sorted(progress) and progress[-1] == 1.0
    assert {"preprocess", "finetune"} & {j["stage"] for j in seen}
    links = {k: v for k, v in job["result"].items() if v not in (None, False)}
    assert links == {
        "avatar": f"/v1/avatars/{avatar_id}",
        "preview": f"/v1/avatars/{avatar_id}/preview",
    }
    assert job["attempts"] == 2 and job["error"] is None  # one start per stage

    avatar = stack.client.get(f"/v1/avatars/{avatar_id}", headers=stack.headers).json()
    assert (avatar["status"], avatar["fine_tuned"]) == ("ready", True)
    preview = stack.client.get(f"/v1/avatars/{avatar_id}/preview", headers=stack.headers)
    assert preview.status_code == 200 and preview.content.startswith(b"\x89PNG")

    engine = create_db_engine(stack.settings.database_url)
    with session_scope(create_session_factory(engine)) as session:
        row = session.get(Avatar, avatar_id)
        assert row is not None and row.identity_embedding and row.artifact_path
        assert np.isfinite(np.frombuffer(row.identity_embedding, "<f4")).all()
        artifact = stack.settings.artifacts_dir / row.artifact_path
    engine.dispose()
    assert artifact.is_file() and artifact.stat().st_size > 0


def test_a_photo_without_a_face_is_refused_at_upload(stack: Stack) -> None:
    files = [("photos", ("me.jpg", no_face_photo(), "image/jpeg"))]
    r = stack.client.post("/v1/avatars", files=files, headers=stack.headers)
    assert r.status_code == 422 and r.json()["error"]["code"] == "no_face", r.text
    assert r.json()["error"]["details"] == {"photo": 0}
    # (With LPD_PHOTO_FACE_CHECK=false the worker fails the job with the same code:
    # tests/unit/test_worker_stages.py.)


def test_cancel_queued_and_running_jobs(stack: Stack) -> None:
    running = stack.create(face_photo(), fine_tune="light", steps=200)
    queued = stack.create(face_photo(), fine_tune="full", steps=3)  # behind it (one worker)
    r = stack.client.post(f"/v1/jobs/{queued['job']['id']}/cancel", headers=stack.headers)
    assert (r.status_code, r.json()["status"]) == (200, "canceled")

    run_id = running["job"]["id"]
    stack.wait(run_id, lambda j: j["status"] == "running" and j["stage"] == "finetune")
    stack.wait(run_id, lambda j: j["progress"] > 0.1)  # steps are being taken
    r = stack.client.post(f"/v1/jobs/{run_id}/cancel", headers=stack.headers)
    assert (r.status_code, r.json()["status"]) == (200, "canceled")

    # The worker notices, drops its state, and goes on to the (canceled) next job.
    tenant_avatars = stack.settings.artifacts_dir / "tenants"
    work = list(tenant_avatars.glob(f"*/avatars/{running['avatar']['id']}/finetune/*"))
    deadline = time.monotonic() + 60
    while work and time.monotonic() < deadline:
        time.sleep(0.5)
        work = list(tenant_avatars.glob(f"*/avatars/{running['avatar']['id']}/finetune/*"))
    assert work == [], stack.worker.tail()
    assert stack.job(run_id)["status"] == "canceled"
    assert stack.job(queued["job"]["id"])["attempts"] == 0  # never started
    avatar = stack.client.get(f"/v1/avatars/{running['avatar']['id']}", headers=stack.headers)
    assert (avatar.json()["status"], avatar.json()["fine_tuned"]) == ("ready", False)


def test_readyz_sees_the_worker(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(health, "check_triton", lambda backend: True)
    r = stack.client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json()["checks"]["workers"] is True
    assert r.json()["queues"]["preprocess"] >= 1 and r.json()["queues"]["finetune"] >= 1


def test_a_killed_worker_s_finetune_resumes(stack: Stack) -> None:
    created = stack.create(face_photo(), fine_tune="light", steps=8)
    job_id, avatar_id = created["job"]["id"], created["avatar"]["id"]
    state: Path | None = None
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while state is None and time.monotonic() < deadline:
        found = list(
            stack.settings.artifacts_dir.glob(
                f"tenants/*/avatars/{avatar_id}/finetune/*.work/optim.pt"
            )
        )
        state = found[0] if found else None
        time.sleep(0.2)
    assert state is not None, stack.worker.tail()
    stack.worker.kill(signal.SIGKILL)  # mid fine-tune: no cleanup, message unacknowledged
    saved = stack.db_job(job_id)
    assert saved.status.value == "running"

    time.sleep(stack.settings.broker_visibility_timeout_s + 1)  # the message becomes visible
    stack.start_worker("w2")
    job, _ = stack.wait(job_id, finished)
    assert job["status"] == "succeeded", stack.worker.tail()
    result = stack.db_job(job_id).result
    assert result is not None and result["resumed_from_step"] >= 2, result
    assert job["attempts"] == 3  # preprocess, fine-tune, the takeover
