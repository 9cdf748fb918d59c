"""POST /v1/reenactments and result downloads with TestClient: real encoded videos checked
with PyAV, a table of bad inputs with their typed errors, tenant isolation, HTTP Range and
signed links. SQLite in tmp_path; the queue is a recorder (the worker has its own tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.models import Avatar, AvatarStatus, Job, JobStatus, new_id
from service.queue import REENACT_TASK
from service.signing import UrlSigner
from tests.media_samples import encode_clip, panning_frames, tone
from tests.unit.test_avatars_api import (  # reuse the API fixtures
    RecordingQueue,
    alice,  # noqa: F401
    app,  # noqa: F401
    bob,  # noqa: F401
    client,  # noqa: F401
    encode,
    png_declaring,
    queue,  # noqa: F401
)

SECRET = "test-signing-secret"


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url="127.0.0.1:1",
        readiness_timeout_s=0.5,
        required_queues=(),
        max_photo_pixels=1_000_000,
        max_video_bytes=2_000_000,
        max_video_duration_s=3.0,
        max_video_resolution=320,
        max_video_fps=30.0,
        signed_url_secret=SECRET,
        max_active_jobs_per_tenant=3,
    )


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """1 s of a real face panning, 25 fps, with AAC audio."""
    path = tmp_path_factory.mktemp("clips") / "driver.mp4"
    return encode_clip(path, panning_frames(25, size=128), fps=25, audio=tone(1.0)).read_bytes()


def make_clip(tmp_path: Path, n: int = 10, size: int = 64, fps: int = 25, **kw: Any) -> bytes:
    frames = [np.full((size, size, 3), 10 * i % 255, np.uint8) for i in range(n)]
    return encode_clip(tmp_path / f"c{n}-{size}-{fps}.mp4", frames, fps=fps, **kw).read_bytes()


def faststart_truncated(tmp_path: Path) -> bytes:
    """An MP4 with its index first (as streaming encoders write it), cut at 60 %: it opens,
    then the frames stop early."""
    path = tmp_path / "faststart.mp4"
    with av.open(str(path), "w", options={"movflags": "faststart"}) as out:
        stream = out.add_stream("libx264", rate=25)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        rng = np.random.default_rng(0)
        for _ in range(50):
            image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode())
    data = path.read_bytes()
    return data[: int(len(data) * 0.6)]


def add_avatar(sessions: sessionmaker[Session], headers: dict[str, str], ready: bool = True) -> str:
    """An avatar row of the key's tenant (ready = with an identity embedding)."""
    from service.auth import authenticate

    with session_scope(sessions) as session:
        principal = authenticate(session, headers["Authorization"])
        avatar = Avatar(
            tenant_id=principal.tenant_id,
            name="ada",
            status=AvatarStatus.READY if ready else AvatarStatus.PENDING,
            identity_embedding=np.ones(8, "<f4").tobytes() if ready else None,
        )
        session.add(avatar)
        session.flush()
        return avatar.id


def post(
    client: TestClient,  # noqa: F811
    headers: dict[str, str],
    video: bytes | None,
    image: bytes | None = None,
    **fields: Any,
) -> Any:
    files = []
    if video is not None:
        files.append(("video", ("clip.mp4", video, "video/mp4")))
    if image is not None:
        files.append(("background_image", ("bg.png", image, "image/png")))
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    return client.post("/v1/reenactments", files=files or None, data=data, headers=headers)


def test_create_checks_the_video_stores_it_and_queues_the_job(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    queue: RecordingQueue,  # noqa: F811
    settings: Settings,
    clip: bytes,
) -> None:
    avatar_id = add_avatar(sessions, alice)
    r = post(client, alice, clip, avatar_id=avatar_id, output="webm", keep_audio=True)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "reenact" and job["status"] == "queued"
    assert job["avatar_id"] == avatar_id
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert queue.sent == [(REENACT_TASK, job["id"])]
    with session_scope(sessions) as session:
        stored = session.get(Job, job["id"])
        assert stored is not None
        assert stored.params["output"] == "webm"
        assert stored.params["driver"] == {
            "frames": 25,
            "fps": 25.0,
            "width": 128,
            "height": 128,
            "audio": True,
        }
    inputs = list((settings.artifacts_dir / "tenants").rglob("input/*"))
    assert [p.name for p in inputs] == ["driver"]  # never the client's filename
    assert inputs[0].read_bytes() == clip


def test_background_image_is_decoded_and_stored(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
) -> None:
    avatar_id = add_avatar(sessions, alice)
    bg = encode(Image.new("RGB", (40, 30), (10, 200, 30)), "PNG")
    r = post(client, alice, clip, bg, avatar_id=avatar_id, background="image")
    assert r.status_code == 202, r.text
    names = sorted(p.name for p in (settings.artifacts_dir / "tenants").rglob("input/*"))
    assert names == ["background", "driver"]


def not_an_mp4(tmp_path: Path) -> bytes:
    return encode(Image.new("RGB", (64, 64)), "JPEG")  # an image sent as the video


BAD_VIDEOS: list[tuple[str, Callable[[Path], bytes], int, str]] = [
    ("truncated", faststart_truncated, 422, "truncated_video"),
    ("cut before its index", lambda p: make_clip(p)[:1000], 422, "not_a_video"),
    ("a jpeg", not_an_mp4, 422, "not_a_video"),
    ("text", lambda p: b"hello, this is not a video\n" * 20, 422, "not_a_video"),
    (
        "audio only",
        lambda p: encode_clip(p / "a.m4a", [], audio=tone(0.5), video=False).read_bytes(),
        422,
        "not_a_video",
    ),
    ("too long", lambda p: make_clip(p, n=100), 413, "video_too_long"),
    ("too large", lambda p: make_clip(p, n=5, size=400), 413, "video_too_large"),
    ("too fast", lambda p: make_clip(p, n=10, fps=60), 422, "video_too_fast"),
    ("too many bytes", lambda p: b"\0" * 2_100_000, 413, "video_too_large"),
]


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [case[1:] for case in BAD_VIDEOS],
    ids=[case[0] for case in BAD_VIDEOS],
)
def test_bad_videos_get_typed_errors_and_leave_nothing_behind(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    queue: RecordingQueue,  # noqa: F811
    settings: Settings,
    tmp_path: Path,
    make: Callable[[Path], bytes],
    status: int,
    code: str,
) -> None:
    avatar_id = add_avatar(sessions, alice)
    r = post(client, alice, make(tmp_path), avatar_id=avatar_id)
    assert (r.status_code, r.json()["error"]["code"]) == (status, code), r.text
    assert queue.sent == []
    assert not list((settings.artifacts_dir / "tenants").rglob("jobs/*"))


def test_bad_requests_get_typed_errors(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    bob: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    queue: RecordingQueue,  # noqa: F811
    clip: bytes,
) -> None:
    mine = add_avatar(sessions, alice)
    pending = add_avatar(sessions, alice, ready=False)
    bobs = add_avatar(sessions, bob)
    bomb = png_declaring(30_000, 30_000)
    cases: list[tuple[dict[str, Any], bytes | None, bytes | None, int, str]] = [
        ({}, clip, None, 422, "invalid_request"),  # no avatar_id
        ({"avatar_id": mine}, None, encode(Image.new("RGB", (8, 8))), 422, "no_video"),
        ({"avatar_id": new_id()}, clip, None, 404, "avatar_not_found"),
        ({"avatar_id": bobs}, clip, None, 404, "avatar_not_found"),  # not 403
        ({"avatar_id": pending}, clip, None, 409, "avatar_not_ready"),
        ({"avatar_id": mine, "output": "gif"}, clip, None, 422, "invalid_request"),
        ({"avatar_id": mine, "background": "image"}, clip, None, 422, "invalid_request"),
        ({"avatar_id": mine, "background": "image"}, clip, bomb, 413, "photo_too_large"),
        ({"avatar_id": mine, "background": "image"}, clip, b"GIF89a", 422, "not_an_image"),
        ({"avatar_id": mine}, clip, encode(Image.new("RGB", (8, 8))), 422, "invalid_request"),
        (
            {"avatar_id": mine, "background": "color", "paste_back": True},
            clip,
            None,
            422,
            "invalid_request",
        ),
        ({"avatar_id": mine, "background_color": "green"}, clip, None, 422, "invalid_request"),
        ({"avatar_id": mine, "bogus": 1}, clip, None, 422, "invalid_request"),
    ]
    for fields, video, background, status, code in cases:
        r = post(client, alice, video, background, **fields)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), (fields, r.text)
    r = client.post(
        "/v1/reenactments", content=clip, headers={**alice, "Content-Type": "video/mp4"}
    )
    assert (r.status_code, r.json()["error"]["code"]) == (415, "unsupported_media_type")
    assert post(client, {}, clip, avatar_id=mine).status_code == 401
    assert queue.sent == []


def test_queue_down_is_503_and_forgets_the_job(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    queue: RecordingQueue,  # noqa: F811
    settings: Settings,
    clip: bytes,
) -> None:
    queue.down = True
    r = post(client, alice, clip, avatar_id=add_avatar(sessions, alice))
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.json()["error"]["code"] == "queue_unavailable"
    assert client.get("/v1/jobs", headers=alice).json()["items"] == []
    assert not list((settings.artifacts_dir / "tenants").rglob("jobs/*"))


# --- downloads -------------------------------------------------------------------------------


def finish(sessions: sessionmaker[Session], settings: Settings, job_id: str, data: bytes) -> Path:
    """Play the worker's part: write a result file and mark the job succeeded."""
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        folder = settings.artifacts_dir / "tenants" / job.tenant_id / "jobs" / job_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "video.mp4").write_bytes(data)
        transition(session, job_id, JobStatus.RUNNING)
        result = {"files": {"video": "video.mp4"}, "frames": 25, "fps": 25.0, "audio": True}
        transition(session, job_id, JobStatus.SUCCEEDED, result=result)
    return folder / "video.mp4"


def test_downloads_stream_with_range_and_signed_links(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    bob: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
) -> None:
    job_id = post(client, alice, clip, avatar_id=add_avatar(sessions, alice)).json()["id"]
    r = client.get(f"/v1/jobs/{job_id}/files/video", headers=alice)
    assert (r.status_code, r.json()["error"]["code"]) == (409, "job_not_finished")

    data = bytes(range(256)) * 40
    finish(sessions, settings, job_id, data)
    job = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    links = job["result"]
    assert links["video"] == f"/v1/jobs/{job_id}/files/video"
    assert links["frames"] == 25 and links["audio"] is True and links["mask"] is None

    r = client.get(links["video"], headers=alice)
    assert r.status_code == 200 and r.content == data
    assert r.headers["content-type"] == "video/mp4" and r.headers["accept-ranges"] == "bytes"
    r = client.get(links["video"], headers={**alice, "Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == data[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(data)}"
    assert client.get(links["video"], headers=bob).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/files/mask", headers=alice).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/files/other", headers=alice).status_code == 422

    signed = links["video_url"]
    r = client.get(signed)  # no API key
    assert r.status_code == 200 and r.content == data
    assert client.get(signed, headers={"Range": "bytes=0-9"}).content == data[:10]
    tampered = signed.replace("/video?", "/mask?")
    assert client.get(tampered).json()["error"]["code"] == "invalid_signature"
    forged = UrlSigner(b"another secret", 60).sign(job_id, "video")[0]
    assert client.get(forged).status_code == 403
    for junk in ("%C3%A9" * 32, "00"):  # non-ASCII, short: typed 422, never a 500
        bad = client.get(f"/v1/files/{job_id}/video?expires=9999999999&signature={junk}")
        assert (bad.status_code, bad.json()["error"]["code"]) == (422, "invalid_request")
    past = UrlSigner(SECRET.encode(), -10, clock=time.time).sign(job_id, "video")[0]
    r = client.get(past)
    assert (r.status_code, r.json()["error"]["message"]) == (403, "the link has expired")


def test_expired_results_are_410(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
) -> None:
    job_id = post(client, alice, clip, avatar_id=add_avatar(sessions, alice)).json()["id"]
    finish(sessions, settings, job_id, b"x" * 10).unlink()
    r = client.get(f"/v1/jobs/{job_id}/files/video", headers=alice)
    assert (r.status_code, r.json()["error"]["code"]) == (410, "result_expired")


def test_no_signed_links_without_a_secret(
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,  # noqa: F811
    clip: bytes,
) -> None:
    from service.main import create_app

    unsigned = create_app(settings.model_copy(update={"signed_url_secret": SecretStr("")}))
    unsigned.state.queue = queue
    with TestClient(unsigned) as c:
        job_id = post(c, alice, clip, avatar_id=add_avatar(sessions, alice)).json()["id"]
        finish(sessions, settings, job_id, b"x" * 10)
        links = c.get(f"/v1/jobs/{job_id}", headers=alice).json()["result"]
        assert links["video"] and links["video_url"] is None
        r = c.get(f"/v1/files/{job_id}/video?expires=9999999999&signature={'0' * 64}")
        assert r.status_code == 404


def test_openapi_documents_the_routes(client: TestClient) -> None:  # noqa: F811
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/v1/reenactments"]["post"]["requestBody"]["content"]
    assert {"video", "avatar_id", "output", "paste_back"} <= set(
        body["multipart/form-data"]["schema"]["properties"]
    )
    assert "206" in spec["paths"]["/v1/jobs/{job_id}/files/{name}"]["get"]["responses"]


def test_idempotency_key_replays_the_first_job(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    queue: RecordingQueue,  # noqa: F811
    clip: bytes,
    tmp_path: Path,
) -> None:
    avatar_id = add_avatar(sessions, alice)
    keyed = {**alice, "Idempotency-Key": "render-42"}
    first = post(client, keyed, clip, avatar_id=avatar_id)
    again = post(client, keyed, clip, avatar_id=avatar_id)
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["Location"] == first.headers["Location"]
    assert len(queue.sent) == 1 and len(client.get("/v1/jobs", headers=alice).json()["items"]) == 1
    other = post(client, keyed, make_clip(tmp_path), avatar_id=avatar_id)
    assert (other.status_code, other.json()["error"]["code"]) == (422, "idempotency_key_reused")


def test_active_job_quota(
    client: TestClient,  # noqa: F811
    alice: dict[str, str],  # noqa: F811
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,  # noqa: F811
    clip: bytes,
) -> None:
    avatar_id = add_avatar(sessions, alice)
    for _ in range(settings.max_active_jobs_per_tenant):
        assert post(client, alice, clip, avatar_id=avatar_id).status_code == 202
    r = post(client, alice, clip, avatar_id=avatar_id)
    assert (r.status_code, r.json()["error"]["code"]) == (429, "quota_exceeded")
    assert r.headers["Retry-After"] and r.json()["error"]["details"]["quota"] == "active_jobs"
    assert len(queue.sent) == settings.max_active_jobs_per_tenant
