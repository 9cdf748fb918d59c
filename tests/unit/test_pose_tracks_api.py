"""Pose tracks, track-driven and batch reenactments, and pose-space renders through the API
(TestClient, SQLite in tmp_path, a recording queue): what is stored and queued, the typed
errors for bad input, tenant isolation, quotas, idempotency, deletion and expiry.

Ready tracks are written here as the worker writes them (service.pose_tracks.save_track);
the worker itself runs against a real Triton in tests/integration/test_pose_tracks.py."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from model.pose_space import interpolate_keyframes, retime, smooth
from service.auth import authenticate
from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.main import create_app
from service.models import Job, JobKind, JobStatus, PoseTrack, PoseTrackStatus, utcnow
from service.pose_tracks import (
    DESCRIPTORS,
    VIDEO,
    TrackData,
    encoder_fingerprint,
    save_track,
    track_dir,
)
from service.queue import REENACT_TASK
from service.storage import ArtifactStore
from tests.media_samples import encode_clip, panning_frames, tone
from tests.unit.test_avatars_api import RecordingQueue, make_key
from tests.unit.test_reenactments_api import add_avatar
from workers.maintenance import expire_pose_tracks

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-64.safetensors"
D = 256


@pytest.fixture
def settings(db_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        triton_url="127.0.0.1:1",
        readiness_timeout_s=0.5,
        required_queues=(),
        base_checkpoint=DEMO,
        max_video_bytes=2_000_000,
        max_video_duration_s=3.0,
        max_video_resolution=320,
        max_active_jobs_per_tenant=4,
        max_render_frames=60,
        max_batch_avatars=3,
        signed_url_secret="s3cret",
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


@pytest.fixture
def alice(sessions: sessionmaker[Session]) -> dict[str, str]:
    return make_key(sessions, "alice")


@pytest.fixture
def bob(sessions: sessionmaker[Session]) -> dict[str, str]:
    return make_key(sessions, "bob")


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("clips") / "driver.mp4"
    return encode_clip(path, panning_frames(10, size=96), fps=10, audio=tone(1.0)).read_bytes()


def track_poses(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)


def ready_track(
    sessions: sessionmaker[Session],
    settings: Settings,
    headers: dict[str, str],
    frames: int = 20,
    fps: float = 10.0,
    **fields: Any,
) -> str:
    """A track row as the pose-track job leaves it, with its descriptor file."""
    with session_scope(sessions) as session:
        tenant = authenticate(session, headers["Authorization"]).tenant_id
        values: dict[str, Any] = {
            "tenant_id": tenant,
            "name": "t",
            "status": PoseTrackStatus.READY,
            "frames": frames,
            "fps": fps,
            "duration_s": frames / fps,
            "dim": D,
            "face_frames": frames,
            "width": 96,
            "height": 96,
            "audio": False,
            "keep_video": True,
            "encoder": encoder_fingerprint(DEMO),
            "expires_at": utcnow() + timedelta(days=1),
        }
        track = PoseTrack(**{**values, **fields})
        session.add(track)
        session.flush()
        track_id, tenant_id = track.id, track.tenant_id
    store = ArtifactStore(settings.artifacts_dir)
    data = TrackData(
        poses=track_poses(frames),
        times=np.arange(frames) / fps,
        boxes=np.tile(np.array([[0.0, 0.0, 96.0, 96.0]]), (frames, 1)),
        faces=np.ones(frames, bool),
    )
    save_track(store, track_dir(store, tenant_id, track_id) / DESCRIPTORS, data)
    return track_id


def error(r: Any) -> str:
    return str(r.json()["error"]["code"])


def post_track(client: TestClient, headers: dict[str, str], video: bytes, **fields: Any) -> Any:
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
    files = [("video", ("d.mp4", video, "video/mp4"))]
    return client.post("/v1/pose-tracks", files=files, data=data, headers=headers)


def stored_poses(settings: Settings, job: Job) -> np.ndarray:
    store = ArtifactStore(settings.artifacts_dir)
    path = store.job_input_dir(job.tenant_id, job.id) / job.params["poses"]
    return np.load(path, allow_pickle=False)


def db_job(sessions: sessionmaker[Session], job_id: str) -> Job:
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


# --- pose tracks -----------------------------------------------------------------------------


def test_create_stores_the_video_and_queues_a_pose_track_job(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
) -> None:
    r = post_track(client, alice, clip, name="keynote", keep_video=False)
    assert r.status_code == 202, r.text
    body = r.json()
    track, job = body["pose_track"], body["job"]
    assert track["status"] == "pending" and track["name"] == "keynote"
    assert (track["width"], track["height"], track["fps"]) == (96, 96, 10.0)
    assert track["video"] is False and track["expires_at"] is not None
    assert job["kind"] == "pose_track" and r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert queue.sent == [(REENACT_TASK, job["id"])]
    stored = db_job(sessions, job["id"])
    assert stored.pose_track_id == track["id"] and stored.params["driver"]["audio"] is True
    store = ArtifactStore(settings.artifacts_dir)
    video = track_dir(store, stored.tenant_id, track["id"]) / VIDEO
    assert video.read_bytes() == clip

    got = client.get(f"/v1/pose-tracks/{track['id']}", headers=alice).json()
    assert got["status"] == "pending" and got["job_id"] == job["id"]
    listed = client.get("/v1/pose-tracks", headers=alice).json()["items"]
    assert [t["id"] for t in listed] == [track["id"]]
    assert client.get(f"/v1/pose-tracks/{track['id']}", headers=bob).status_code == 404
    assert client.get("/v1/pose-tracks", headers=bob).json()["items"] == []
    d = client.get(f"/v1/pose-tracks/{track['id']}/descriptors", headers=alice)
    assert (d.status_code, error(d)) == (409, "pose_track_not_ready")

    # Its job fails: the track reads failed, even before the worker's bookkeeping.
    with session_scope(sessions) as session:
        transition(session, job["id"], JobStatus.FAILED, error_code="no_face")
    assert client.get(f"/v1/pose-tracks/{track['id']}", headers=alice).json()["status"] == (
        "failed"
    )


def test_create_refuses_bad_uploads(
    client: TestClient, alice: dict[str, str], tmp_path: Path, settings: Settings
) -> None:
    r = client.post("/v1/pose-tracks", files={"name": (None, "x")}, headers=alice)
    assert (r.status_code, error(r)) == (422, "no_video")
    r = post_track(client, alice, b"not a video at all")
    assert (r.status_code, error(r)) == (422, "not_a_video")
    long = encode_clip(tmp_path / "long.mp4", panning_frames(40, size=64), fps=10).read_bytes()
    r = post_track(client, alice, long)
    assert (r.status_code, error(r)) == (413, "video_too_long")
    r = client.post("/v1/pose-tracks", json={"name": "x"}, headers=alice)
    assert (r.status_code, error(r)) == (415, "unsupported_media_type")
    assert not list((settings.artifacts_dir).rglob("driver"))  # nothing kept


def test_descriptors_download(
    client: TestClient, alice: dict[str, str], sessions: sessionmaker[Session], settings: Settings
) -> None:
    track_id = ready_track(sessions, settings, alice)
    r = client.get(f"/v1/pose-tracks/{track_id}/descriptors", headers=alice)
    assert r.status_code == 200
    path = Path(settings.artifacts_dir) / "dl.npz"
    path.write_bytes(r.content)
    with np.load(path) as npz:
        assert np.array_equal(npz["poses"], track_poses(20))
        assert npz["times"].shape == (20,) and npz["boxes"].shape == (20, 4)


# --- reenactments driven by a track ----------------------------------------------------------


def reenact_json(client: TestClient, headers: dict[str, str], **body: Any) -> Any:
    return client.post("/v1/reenactments", json=body, headers=headers)


def test_reenact_from_a_track_as_json_or_multipart(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,
) -> None:
    avatar = add_avatar(sessions, alice)
    track = ready_track(sessions, settings, alice, audio=True)
    r = reenact_json(client, alice, avatar_id=avatar, pose_track_id=track, paste_back=True)
    assert r.status_code == 202, r.text
    job = db_job(sessions, r.json()["id"])
    assert job.kind is JobKind.REENACT and job.pose_track_id == track
    assert job.params["driver"] == {
        "frames": 20,
        "fps": 10.0,
        "width": 96,
        "height": 96,
        "audio": True,
    }
    assert "video" not in job.params and queue.sent[-1] == (REENACT_TASK, job.id)
    form = {"avatar_id": (None, avatar), "pose_track_id": (None, track)}
    r = client.post("/v1/reenactments", files=form, headers=alice)
    assert r.status_code == 202, r.text
    assert db_job(sessions, r.json()["id"]).pose_track_id == track


def test_reenact_from_a_track_refusals(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
) -> None:
    avatar = add_avatar(sessions, alice)
    track = ready_track(sessions, settings, alice)
    both = client.post(
        "/v1/reenactments",
        files=[("video", ("d.mp4", clip, "video/mp4"))],
        data={"avatar_id": avatar, "pose_track_id": track},
        headers=alice,
    )
    assert (both.status_code, error(both)) == (422, "conflicting_driver")
    neither = reenact_json(client, alice, avatar_id=avatar)
    assert (neither.status_code, error(neither)) == (422, "no_video")
    image = reenact_json(client, alice, avatar_id=avatar, pose_track_id=track, background="image")
    assert (image.status_code, error(image)) == (422, "invalid_request")

    cases = {
        "pose_track_not_found": (404, ready_track(sessions, settings, bob)),
        "pose_track_not_ready": (
            409,
            ready_track(sessions, settings, alice, status=PoseTrackStatus.PENDING),
        ),
        "pose_track_stale": (409, ready_track(sessions, settings, alice, encoder="0" * 16)),
        "pose_track_expired": (
            410,
            ready_track(sessions, settings, alice, expires_at=utcnow() - timedelta(seconds=1)),
        ),
    }
    for code, (status, track_id) in cases.items():
        r = reenact_json(client, alice, avatar_id=avatar, pose_track_id=track_id)
        assert (r.status_code, error(r)) == (status, code), code
    no_video = ready_track(sessions, settings, alice, keep_video=False)
    r = reenact_json(client, alice, avatar_id=avatar, pose_track_id=no_video, paste_back=True)
    assert (r.status_code, error(r)) == (409, "pose_track_no_video")
    assert reenact_json(client, alice, avatar_id=avatar, pose_track_id=no_video).status_code == 202
    pending = add_avatar(sessions, alice, ready=False)
    r = reenact_json(client, alice, avatar_id=pending, pose_track_id=track)
    assert (r.status_code, error(r)) == (409, "avatar_not_ready")


# --- batch -----------------------------------------------------------------------------------


def test_batch_makes_one_job_per_avatar_and_replays(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,
) -> None:
    avatars = [add_avatar(sessions, alice) for _ in range(3)]
    track = ready_track(sessions, settings, alice)
    body = {"pose_track_id": track, "avatar_ids": avatars, "options": {"output": "webm"}}
    headers = {**alice, "Idempotency-Key": "batch-1"}
    r = client.post("/v1/reenactments/batch", json=body, headers=headers)
    assert r.status_code == 202, r.text
    jobs = r.json()["jobs"]
    assert [j["avatar_id"] for j in jobs] == avatars
    assert [task for task, _ in queue.sent] == [REENACT_TASK] * 3
    for j in jobs:
        stored = db_job(sessions, j["id"])
        assert stored.pose_track_id == track and stored.params["output"] == "webm"
    again = client.post("/v1/reenactments/batch", json=body, headers=headers)
    assert again.status_code == 202 and again.headers["Idempotent-Replayed"] == "true"
    assert [j["id"] for j in again.json()["jobs"]] == [j["id"] for j in jobs]
    assert len(queue.sent) == 3


def test_batch_is_all_or_nothing(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,
) -> None:
    avatars = [add_avatar(sessions, alice) for _ in range(3)]
    track = ready_track(sessions, settings, alice)
    first = reenact_json(client, alice, avatar_id=avatars[0], pose_track_id=track)
    assert first.status_code == 202
    second = reenact_json(client, alice, avatar_id=avatars[1], pose_track_id=track)
    assert second.status_code == 202  # 2 of the 4 allowed active jobs are in use
    body = {"pose_track_id": track, "avatar_ids": avatars}
    r = client.post("/v1/reenactments/batch", json=body, headers=alice)
    assert (r.status_code, error(r)) == (429, "quota_exceeded")
    assert r.json()["error"]["details"] == {"quota": "active_jobs", "limit": 4, "used": 2}

    pending = add_avatar(sessions, alice, ready=False)
    r = client.post(
        "/v1/reenactments/batch",
        json={"pose_track_id": track, "avatar_ids": [avatars[2], pending]},
        headers=alice,
    )
    assert (r.status_code, error(r)) == (409, "avatar_not_ready")
    with session_scope(sessions) as session:
        assert len(session.scalars(select(Job.id)).all()) == 2  # nothing from the batches
    queue.down = True
    r = client.post(
        "/v1/reenactments/batch",
        json={"pose_track_id": track, "avatar_ids": avatars[2:]},
        headers=alice,
    )
    assert (r.status_code, error(r)) == (503, "queue_unavailable")
    with session_scope(sessions) as session:
        assert len(session.scalars(select(Job.id)).all()) == 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"avatar_ids": ["a", "b", "c", "d"]}, 422, "too_many_avatars"),
        ({"avatar_ids": ["a", "a"]}, 422, "invalid_request"),
        ({"avatar_ids": []}, 422, "invalid_request"),
        ({"avatar_ids": ["a"], "options": {"background": "image"}}, 422, "invalid_request"),
        (
            {"avatar_ids": ["a"], "options": {"background": "color", "paste_back": True}},
            422,
            "invalid_request",
        ),
        ({"avatar_ids": ["a"], "pose_track_id": "nope"}, 404, "avatar_not_found"),
    ],
)
def test_batch_refusals(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    body: dict[str, Any],
    status: int,
    code: str,
) -> None:
    body = {"pose_track_id": ready_track(sessions, settings, alice), **body}
    r = client.post("/v1/reenactments/batch", json=body, headers=alice)
    assert (r.status_code, error(r)) == (status, code), r.text


# --- renders ---------------------------------------------------------------------------------


def render(client: TestClient, headers: dict[str, str], avatar: str, **body: Any) -> Any:
    return client.post(f"/v1/avatars/{avatar}/render", json=body, headers=headers)


def test_render_from_keyframes_stores_the_interpolated_poses(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,
) -> None:
    avatar = add_avatar(sessions, alice)
    track = ready_track(sessions, settings, alice)
    key = track_poses(1, seed=9)[0]
    keyframes = [
        {"t": 0.0, "pose_track_id": track, "frame": 3},
        {"t": 0.5, "pose": key.tolist()},
        {"t": 1.2, "pose_track_id": track, "frame": 19},
    ]
    r = render(client, alice, avatar, keyframes=keyframes, fps=20, smooth_sigma_frames=0)
    assert r.status_code == 202, r.text
    job = db_job(sessions, r.json()["id"])
    assert job.kind is JobKind.RENDER and job.avatar_id == avatar
    assert (job.params["frames"], job.params["fps"], job.params["output"]) == (25, 20.0, "mp4")
    expected = interpolate_keyframes(
        [0.0, 0.5, 1.2], np.stack([track_poses(20)[3], key, track_poses(20)[19]]), 20.0
    )
    assert np.array_equal(stored_poses(settings, job), expected)
    assert queue.sent[-1] == (REENACT_TASK, job.id)


def test_render_from_poses_b64_and_a_retimed_track(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    avatar = add_avatar(sessions, alice)
    poses = track_poses(7, seed=4)
    for dtype in ("float32", "float16"):
        blob = base64.b64encode(poses.astype(f"<{dtype[0]}{int(dtype[5:]) // 8}").tobytes())
        r = render(client, alice, avatar, poses_b64=blob.decode(), dtype=dtype, output="png_zip")
        assert r.status_code == 202, r.text
        stored = stored_poses(settings, db_job(sessions, r.json()["id"]))
        np.testing.assert_allclose(stored, poses, rtol=1e-3 if dtype == "float16" else 0)
    r = render(client, alice, avatar, poses=poses.tolist(), fps=12.5)
    job = db_job(sessions, r.json()["id"])
    assert np.array_equal(stored_poses(settings, job), poses) and job.params["fps"] == 12.5

    track = ready_track(sessions, settings, alice)
    r = render(
        client, alice, avatar, pose_track_id=track, speed=0.5, start_s=0.5, end_s=1.5,
        resample="nearest", smooth_sigma_frames=1.5,
    )  # fmt: skip
    assert r.status_code == 202, r.text
    job = db_job(sessions, r.json()["id"])
    times = np.arange(20) / 10.0
    expected = smooth(retime(track_poses(20), times, 10.0, 0.5, 0.5, 1.5, "nearest"), 1.5)
    assert job.params["fps"] == 10.0 and job.params["frames"] == len(expected) == 21
    assert np.array_equal(stored_poses(settings, job), expected)


def _bad_render_bodies(track: str) -> list[tuple[dict[str, Any], int, str]]:
    good = [0.1] * D
    return [
        ({"poses": [good, [0.1] * (D - 1)]}, 422, "pose_dim_mismatch"),
        ({"poses": []}, 422, "no_poses"),
        ({"poses": [good] * 61}, 422, "too_many_frames"),
        ({"keyframes": []}, 422, "no_keyframes"),
        (
            {"keyframes": [{"t": 1.0, "pose": good}, {"t": 0.5, "pose": good}]},
            422,
            "unsorted_keyframes",
        ),
        (
            {"keyframes": [{"t": 0.0, "pose": good}, {"t": 0.01, "pose": good}], "fps": 25},
            422,
            "unsorted_keyframes",
        ),
        (
            {"keyframes": [{"t": 0.0, "pose": good}, {"t": 10.0, "pose": good}]},
            422,
            "too_many_frames",
        ),
        (
            {"keyframes": [{"t": 0.0, "pose_track_id": track, "frame": 20}]},
            422,
            "frame_out_of_range",
        ),
        ({"keyframes": [{"t": 0.0, "pose_track_id": track}]}, 422, "invalid_request"),
        ({"poses_b64": base64.b64encode(b"\0" * 12).decode()}, 422, "pose_dim_mismatch"),
        ({"poses_b64": "***"}, 422, "invalid_request"),
        ({"poses": [good], "pose_track_id": track}, 422, "invalid_request"),
        ({"poses": [good], "speed": 2.0}, 422, "invalid_request"),
        ({"pose_track_id": track, "start_s": 1.5, "end_s": 1.0}, 422, "invalid_time_range"),
        ({"pose_track_id": track, "speed": 0.1}, 422, "too_many_frames"),
        ({"pose_track_id": "0b6f2c3e-8a41-4c55-9d1e-2f7a9b3c4d5e"}, 404, "pose_track_not_found"),
    ]


def test_render_refusals(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    queue: RecordingQueue,
) -> None:
    avatar = add_avatar(sessions, alice)
    track = ready_track(sessions, settings, alice)
    for body, status, code in _bad_render_bodies(track):
        r = render(client, alice, avatar, **body)
        assert (r.status_code, error(r)) == (status, code), (body.keys(), r.text)
    nan = client.post(
        f"/v1/avatars/{avatar}/render",
        content=json.dumps({"poses": [[float("nan")] * D]}),  # Python writes NaN literals
        headers={**alice, "Content-Type": "application/json"},
    )
    assert (nan.status_code, error(nan)) == (422, "non_finite_pose")
    inf = base64.b64encode(np.full((1, D), np.inf, "<f4").tobytes()).decode()
    r = render(client, alice, avatar, poses_b64=inf)
    assert (r.status_code, error(r)) == (422, "non_finite_pose")
    r = client.post(f"/v1/avatars/{avatar}/render", data={"poses": "1"}, headers=alice)
    assert (r.status_code, error(r)) == (415, "unsupported_media_type")
    r = render(client, alice, "0b6f2c3e-8a41-4c55-9d1e-2f7a9b3c4d5e", poses=[[0.1] * D])
    assert (r.status_code, error(r)) == (404, "not_found")
    big = client.post(
        f"/v1/avatars/{avatar}/render",
        content=b"[" + b"0," * 1_000_000 + b"0]",  # 2 MB, over 60 x 256 x 32 B + 1 MiB
        headers={**alice, "Content-Type": "application/json"},
    )
    assert (big.status_code, error(big)) == (413, "payload_too_large")
    assert queue.sent == []
    with session_scope(sessions) as session:
        assert session.scalars(select(Job.id)).all() == []


# --- delete and expiry -----------------------------------------------------------------------


def test_delete_refuses_while_in_use_then_removes_files(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    avatar = add_avatar(sessions, alice)
    track = ready_track(sessions, settings, alice)
    job_id = reenact_json(client, alice, avatar_id=avatar, pose_track_id=track).json()["id"]
    assert client.delete(f"/v1/pose-tracks/{track}", headers=bob).status_code == 404
    r = client.delete(f"/v1/pose-tracks/{track}", headers=alice)
    assert (r.status_code, error(r)) == (409, "pose_track_in_use")
    assert r.json()["error"]["details"] == {"jobs": [job_id]}
    with session_scope(sessions) as session:
        transition(session, job_id, JobStatus.CANCELED)
    folder = track_dir(
        ArtifactStore(settings.artifacts_dir), db_job(sessions, job_id).tenant_id, track
    )
    assert (folder / DESCRIPTORS).is_file()
    assert client.delete(f"/v1/pose-tracks/{track}", headers=alice).status_code == 204
    assert not folder.exists()
    r = client.get(f"/v1/pose-tracks/{track}", headers=alice)
    assert (r.status_code, error(r)) == (404, "not_found")
    assert db_job(sessions, job_id).pose_track_id is None  # the finished job stays


def test_delete_of_a_pending_track_cancels_its_job(
    client: TestClient, alice: dict[str, str], sessions: sessionmaker[Session], clip: bytes
) -> None:
    created = post_track(client, alice, clip).json()
    track, job = created["pose_track"]["id"], created["job"]["id"]
    assert client.delete(f"/v1/pose-tracks/{track}", headers=alice).status_code == 204
    assert db_job(sessions, job).status is JobStatus.CANCELED


def test_expiry_removes_files_and_answers_410(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    avatar = add_avatar(sessions, alice)
    old = ready_track(sessions, settings, alice, expires_at=utcnow() + timedelta(seconds=5))
    fresh = ready_track(sessions, settings, alice)
    store = ArtifactStore(settings.artifacts_dir)
    busy_job = reenact_json(client, alice, avatar_id=avatar, pose_track_id=old).json()["id"]
    later = utcnow() + timedelta(seconds=60)
    assert expire_pose_tracks(sessions, store, later) == 0  # a job still reads it
    with session_scope(sessions) as session:
        transition(session, busy_job, JobStatus.CANCELED)
    assert expire_pose_tracks(sessions, store, later) == 1
    assert expire_pose_tracks(sessions, store, later) == 0  # idempotent
    tenant = db_job(sessions, busy_job).tenant_id
    assert not track_dir(store, tenant, old).exists()
    assert (track_dir(store, tenant, fresh) / DESCRIPTORS).is_file()
    assert client.get(f"/v1/pose-tracks/{old}", headers=alice).json()["status"] == "expired"
    r = reenact_json(client, alice, avatar_id=avatar, pose_track_id=old)
    assert (r.status_code, error(r)) == (410, "pose_track_expired")


# --- the new kinds in webhooks and upkeep ----------------------------------------------------


def test_new_kinds_get_webhooks_requeues_and_result_expiry(
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    clip: bytes,
    db_url: str,
    tmp_path: Path,
) -> None:
    from service.models import WebhookDelivery
    from service.webhooks import event_body
    from workers import maintenance
    from workers.runtime import WorkerContext

    hooks = settings.model_copy(update={"webhook_allow_private_hosts": True})
    queue = RecordingQueue()
    app = create_app(hooks)
    app.state.queue = queue
    with TestClient(app) as client:
        created = post_track(client, alice, clip, callback_url="http://127.0.0.1:9/hook").json()
        avatar = add_avatar(sessions, alice)
        r = render(client, alice, avatar, poses=[[0.5] * D], callback_url="http://127.0.0.1:9/h")
        render_id = r.json()["id"]
    track_job_id, track_id = created["job"]["id"], created["pose_track"]["id"]

    # A pose-track job's final transition writes its event, with the track's link.
    with session_scope(sessions) as session:
        transition(session, track_job_id, JobStatus.RUNNING)
        transition(session, track_job_id, JobStatus.SUCCEEDED, result={"frames": 10})
        delivery = session.scalars(
            select(WebhookDelivery).where(WebhookDelivery.job_id == track_job_id)
        ).one()
        job = session.get(Job, track_job_id)
        assert job is not None
        event = json.loads(event_body(delivery, job))
    assert event["type"] == "job.succeeded"
    assert event["data"]["job"]["kind"] == "pose_track"
    assert event["data"]["job"]["result"]["pose_track"] == f"/v1/pose-tracks/{track_id}"

    # A lost message of a render job is published again, to the reenact queue's task.
    ctx = WorkerContext(hooks, sessions, ArtifactStore(hooks.artifacts_dir), queue)
    later = utcnow() + timedelta(seconds=hooks.job_stalled_after_s + 1)
    assert maintenance.requeue_stalled(ctx, now=later) == [render_id]
    assert queue.sent[-1] == (REENACT_TASK, render_id)

    # A finished render's files expire like a reenactment's.
    store = ArtifactStore(hooks.artifacts_dir)
    with session_scope(sessions) as session:
        transition(session, render_id, JobStatus.RUNNING)
        transition(session, render_id, JobStatus.SUCCEEDED, result={"files": {"zip": "f.zip"}})
        tenant = session.get(Job, render_id).tenant_id  # type: ignore[union-attr]
    (store.job_dir(tenant, render_id) / "f.zip").write_bytes(b"zip")
    report = maintenance.cleanup(ctx, now=utcnow() + timedelta(seconds=hooks.job_result_ttl_s + 1))
    assert report.expired_jobs == 1 and report.expired_pose_tracks == 0  # tracks live longer
    past_ttl = utcnow() + timedelta(seconds=hooks.pose_track_ttl_s + 1)
    assert maintenance.cleanup(ctx, now=past_ttl).expired_pose_tracks == 1
    assert not store.job_dir(tenant, render_id).exists()
    assert db_job(sessions, render_id).result == {"files": {"zip": "f.zip"}, "expired": True}
