"""Avatar and job routes with TestClient: uploads (limits, decoding, bombs), tenant isolation,
paging, cancel, delete, worker readiness. SQLite in tmp_path; the queue is a recorder."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kombu.exceptions import OperationalError
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.main import create_app
from service.models import Avatar, Job, JobStatus
from service.queue import PREPROCESS_TASK
from tests.media_samples import astronaut

# --- fixtures --------------------------------------------------------------------------------


class RecordingQueue:
    """Stands in for Celery: records what the API publishes; can play a dead broker."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.down = False
        self.workers: dict[str, int] = {}

    def enqueue(self, task: str, job_id: str) -> None:
        if self.down:
            raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")
        self.sent.append((task, job_id))

    def workers_per_queue(self, timeout_s: float) -> dict[str, int]:
        return self.workers


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url="127.0.0.1:1",
        readiness_timeout_s=0.5,
        required_queues=(),
        max_photos=3,
        max_photo_bytes=300_000,
        max_photo_pixels=1_000_000,
        max_finetune_steps=50,
        photo_face_check=False,  # most photos here are solid colours; see test_face_check_*
    )


@pytest.fixture
def queue() -> RecordingQueue:
    return RecordingQueue()


@pytest.fixture
def app(settings: Settings, queue: RecordingQueue) -> FastAPI:
    app = create_app(settings)
    app.state.queue = queue
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def make_key(sessions: sessionmaker[Session], tenant: str) -> dict[str, str]:
    with session_scope(sessions) as session:
        key, _ = create_api_key(session, create_tenant(session, tenant), "test")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> dict[str, str]:
    return make_key(sessions, "alice")


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> dict[str, str]:
    return make_key(sessions, "bob")


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def face_jpeg() -> bytes:
    return encode(Image.fromarray(astronaut()).resize((256, 256)))


def tiny_png() -> bytes:
    return encode(Image.new("RGB", (32, 32), (200, 120, 80)), "PNG")


def png_declaring(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR claims `width` x `height` (CRC fixed): a decompression
    bomb's header, without the bomb."""
    data = bytearray(tiny_png())
    struct.pack_into(">II", data, 16, width, height)  # IHDR data starts at byte 16
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def photos(*blobs: bytes, name: str = "face.jpg") -> list[tuple[str, Any]]:
    return [("photos", (name, blob, "image/jpeg")) for blob in blobs]


def post_avatar(client: TestClient, headers: dict[str, str], **fields: Any) -> Any:
    files = fields.pop("files", None) or photos(tiny_png())
    data = {k: str(v) for k, v in fields.items()}
    return client.post("/v1/avatars", files=files, data=data, headers=headers)


def count(sessions: sessionmaker[Session], model: type[Any]) -> int:
    with session_scope(sessions) as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def stored_files(settings: Settings) -> list[Path]:
    root = settings.artifacts_dir
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


# --- create ----------------------------------------------------------------------------------


def test_create_stores_photos_and_queues_the_job(
    client: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    settings: Settings,
) -> None:
    files = photos(face_jpeg(), name="../../etc/passwd") + photos(tiny_png(), name="x.gif")
    r = post_avatar(client, alice, files=files, name="Ada", fine_tune="light", steps=3)
    assert r.status_code == 202, r.text
    body = r.json()
    avatar, job = body["avatar"], body["job"]
    assert (avatar["name"], avatar["status"], avatar["fine_tune"]) == ("Ada", "pending", "light")
    assert avatar["fine_tuned"] is False and avatar["job_id"] == job["id"]
    assert (job["kind"], job["status"], job["progress"]) == ("finetune", "queued", 0.0)
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert queue.sent == [(PREPROCESS_TASK, job["id"])]
    # Named by index and decoded format, never by the client's filename.
    names = [p.relative_to(settings.artifacts_dir).parts[-2:] for p in stored_files(settings)]
    assert names == [("photos", "00.jpg"), ("photos", "01.png")]


def test_zero_shot_is_the_default(client: TestClient, alice: dict[str, str]) -> None:
    r = post_avatar(client, alice)
    assert r.status_code == 202, r.text
    assert r.json()["avatar"]["fine_tune"] == "none"
    assert r.json()["job"]["kind"] == "preprocess"


@pytest.mark.parametrize(
    ("files", "fields", "status", "code"),
    [
        pytest.param(photos(b"GIF89a not really"), {}, 422, "not_an_image", id="not-an-image"),
        pytest.param(photos(b"hello"), {}, 422, "not_an_image", id="text"),
        pytest.param(photos(face_jpeg()[:2000]), {}, 422, "not_an_image", id="truncated-jpeg"),
        pytest.param(photos(*[tiny_png()] * 4), {}, 413, "too_many_photos", id="too-many"),
        pytest.param([("name", (None, "Ada"))], {}, 422, "no_photos", id="zero-photos"),
        pytest.param(photos(b"\xff" * 300_001), {}, 413, "photo_too_large", id="oversize"),
        pytest.param(
            photos(png_declaring(100_000, 100_000)), {}, 413, "photo_too_large", id="bomb"
        ),
        pytest.param(
            photos(png_declaring(2000, 1000)), {}, 413, "photo_too_large", id="too-many-pixels"
        ),
        pytest.param(None, {"fine_tune": "huge"}, 422, "invalid_request", id="bad-fine-tune"),
        pytest.param(None, {"steps": 5}, 422, "invalid_request", id="steps-without-fine-tune"),
        pytest.param(
            None, {"fine_tune": "full", "steps": 51}, 422, "invalid_request", id="too-many-steps"
        ),
        pytest.param(None, {"colour": "red"}, 422, "invalid_request", id="unknown-field"),
        pytest.param(
            [("avatar", ("a.png", tiny_png(), "image/png"))],
            {},
            422,
            "invalid_request",
            id="file-in-wrong-field",
        ),
    ],
)
def test_upload_validation(
    client: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
    settings: Settings,
    files: list[tuple[str, Any]] | None,
    fields: dict[str, Any],
    status: int,
    code: str,
) -> None:
    r = post_avatar(client, alice, files=files, **fields)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    # A rejected upload leaves nothing behind.
    assert stored_files(settings) == []
    assert count(sessions, Avatar) == count(sessions, Job) == 0
    assert queue.sent == []


def test_not_multipart_is_415(client: TestClient, alice: dict[str, str]) -> None:
    r = client.post("/v1/avatars", json={"photos": []}, headers=alice)
    assert r.status_code == 415
    assert r.json()["error"]["code"] == "unsupported_media_type"


def test_declared_length_over_the_limits_is_413(
    client: TestClient, alice: dict[str, str], settings: Settings
) -> None:
    headers = alice | {
        "Content-Type": "multipart/form-data; boundary=x",
        "Content-Length": str(10 * settings.max_photos * settings.max_photo_bytes),
    }
    r = client.post("/v1/avatars", content=b"--x--\r\n", headers=headers)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "payload_too_large"
    assert stored_files(settings) == []


def test_upload_needs_a_key(client: TestClient, queue: RecordingQueue) -> None:
    r = client.post("/v1/avatars", files=photos(tiny_png()))
    assert r.status_code == 401
    assert queue.sent == []


def test_broker_down_is_503_and_leaves_nothing(
    client: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    queue.down = True
    r = post_avatar(client, alice)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "queue_unavailable"
    assert "Retry-After" in r.headers
    assert stored_files(settings) == []
    assert count(sessions, Avatar) == count(sessions, Job) == 0


# --- tenants, paging -------------------------------------------------------------------------


def test_other_tenants_see_404(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], settings: Settings
) -> None:
    created = post_avatar(client, alice).json()
    avatar_id, job_id = created["avatar"]["id"], created["job"]["id"]
    for method, path in [
        ("GET", f"/v1/avatars/{avatar_id}"),
        ("GET", f"/v1/avatars/{avatar_id}/preview"),
        ("DELETE", f"/v1/avatars/{avatar_id}"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
    ]:
        r = client.request(method, path, headers=bob)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"]["code"] == "not_found"
    assert client.get("/v1/avatars", headers=bob).json() == {"items": [], "next_cursor": None}
    assert client.get("/v1/jobs", headers=bob).json()["items"] == []
    # ... and nothing of Alice's changed.
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "queued"
    assert len(stored_files(settings)) == 1


def test_paging_is_newest_first_and_complete(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    made = [post_avatar(client, alice, name=f"a{i}").json()["avatar"]["id"] for i in range(5)]
    post_avatar(client, bob)
    seen, cursor, pages = [], None, 0
    while True:
        params: dict[str, Any] = {"limit": 2} | ({"cursor": cursor} if cursor else {})
        page = client.get("/v1/avatars", params=params, headers=alice).json()
        seen += [a["id"] for a in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert (seen, pages) == (made[::-1], 3)
    jobs = client.get("/v1/jobs", params={"limit": 10}, headers=alice).json()
    assert len(jobs["items"]) == 5 and jobs["next_cursor"] is None
    queued = client.get("/v1/jobs", params={"status": "queued", "limit": 1}, headers=alice).json()
    assert len(queued["items"]) == 1 and queued["next_cursor"]


@pytest.mark.parametrize("cursor", ["nope", "e30", "W10", "WyIyMDI2LTAxLTAxIiwgMV0"])
def test_bad_cursor_is_422(client: TestClient, alice: dict[str, str], cursor: str) -> None:
    r = client.get("/v1/avatars", params={"cursor": cursor}, headers=alice)
    assert r.status_code == 422
    assert r.json()["error"]["code"] == "invalid_cursor"


# --- cancel, delete --------------------------------------------------------------------------


def test_cancel_transitions(
    client: TestClient, alice: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    first = post_avatar(client, alice).json()
    job_id = first["job"]["id"]
    r = client.post(f"/v1/jobs/{job_id}/cancel", headers=alice)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["stage"]) == ("canceled", "canceled")
    assert r.json()["finished_at"] is not None
    # The avatar never got an identity: it cannot become usable.
    avatar = client.get(f"/v1/avatars/{first['avatar']['id']}", headers=alice).json()
    assert avatar["status"] == "failed"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=alice).status_code == 200

    second = post_avatar(client, alice).json()["job"]["id"]
    with session_scope(sessions) as session:
        transition(session, second, JobStatus.RUNNING)
        transition(session, second, JobStatus.SUCCEEDED)
    r = client.post(f"/v1/jobs/{second}/cancel", headers=alice)
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "job_finished"

    third = post_avatar(client, alice).json()["job"]["id"]
    with session_scope(sessions) as session:
        transition(session, third, JobStatus.RUNNING)
    r = client.post(f"/v1/jobs/{third}/cancel", headers=alice)
    assert r.json()["status"] == "canceled"


def test_delete_removes_files_and_cancels_jobs(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    keep = post_avatar(client, alice).json()
    gone = post_avatar(client, alice, fine_tune="light").json()
    with session_scope(sessions) as session:
        transition(session, gone["job"]["id"], JobStatus.RUNNING)
    assert len(stored_files(settings)) == 2

    r = client.delete(f"/v1/avatars/{gone['avatar']['id']}", headers=alice)
    assert r.status_code == 204
    assert client.get(f"/v1/avatars/{gone['avatar']['id']}", headers=alice).status_code == 404
    job = client.get(f"/v1/jobs/{gone['job']['id']}", headers=alice).json()
    assert (job["status"], job["avatar_id"]) == ("canceled", None)
    remaining = stored_files(settings)
    assert len(remaining) == 1 and keep["avatar"]["id"] in str(remaining[0])
    assert client.delete(f"/v1/avatars/{gone['avatar']['id']}", headers=alice).status_code == 404


# --- readiness and docs ----------------------------------------------------------------------


def test_readyz_needs_a_worker_per_required_queue(
    app: FastAPI, settings: Settings, queue: RecordingQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.api.routes import health

    monkeypatch.setattr(health, "check_redis", lambda client: True)
    monkeypatch.setattr(health, "check_triton", lambda backend: True)
    app.state.settings = settings.model_copy(update={"required_queues": ("preprocess", "finetune")})
    queue.workers = {"preprocess": 2, "finetune": 0, "reenact": 0}
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        details = r.json()["error"]["details"]
        assert details["down"] == ["workers"]
        assert details["queues"] == {"preprocess": 2, "finetune": 0, "reenact": 0}
        queue.workers["finetune"] = 1
        r = c.get("/readyz")
        assert r.status_code == 200, r.text
        assert r.json()["checks"]["workers"] is True
        assert r.json()["queues"]["finetune"] == 1


def test_readyz_with_the_broker_down(
    app: FastAPI, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real Celery queue against a closed port: workers read as down, quickly."""
    from service.queue import CeleryQueue, create_celery

    app.state.settings = settings.model_copy(
        update={"required_queues": ("preprocess",), "broker_timeout_s": 0.5}
    )
    app.state.queue = CeleryQueue(create_celery(app.state.settings))
    with TestClient(app) as c:
        r = c.get("/readyz")
    assert r.status_code == 503
    assert "workers" in r.json()["error"]["details"]["down"]


def test_openapi_documents_the_upload(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    post = spec["paths"]["/v1/avatars"]["post"]
    schema = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert schema["required"] == ["photos"]
    assert {"photos", "name", "fine_tune", "steps"} <= set(schema["properties"])
    assert {"202", "413", "415", "422", "503"} <= set(post["responses"])
    assert "/v1/jobs/{job_id}/cancel" in spec["paths"]
    assert spec["components"]["schemas"]["JobOut"]["examples"]


def two_faces_jpeg() -> bytes:
    """Two people side by side: the astronaut's face twice, the same size."""
    face = astronaut()[:300, 80:380]
    return encode(Image.fromarray(np.concatenate([face, face], axis=1)))


@pytest.mark.parametrize(
    ("blob", "code", "details"),
    [
        (tiny_png(), "no_face", {"photo": 1}),
        (two_faces_jpeg(), "multiple_faces", {"photo": 1, "faces": 2}),
    ],
    ids=["no face", "two faces"],
)
def test_face_check_refuses_photos_without_exactly_one_person(
    settings: Settings,
    queue: RecordingQueue,
    alice: dict[str, str],
    blob: bytes,
    code: str,
    details: dict[str, int],
) -> None:
    app = create_app(settings.model_copy(update={"photo_face_check": True}))
    app.state.queue = queue
    with TestClient(app) as client:
        r = post_avatar(client, alice, files=photos(face_jpeg(), blob))
        assert (r.status_code, r.json()["error"]["code"]) == (422, code), r.text
        assert r.json()["error"]["details"] == details
        assert queue.sent == [] and not stored_files(settings)
        r = post_avatar(client, alice, files=photos(face_jpeg()))
        assert r.status_code == 202, r.text  # one person passes
