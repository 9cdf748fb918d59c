"""The artifact store backed by a bucket (storage=s3), against moto's in-process S3 mock:
push/pull between two hosts' directories, deletes, presigned downloads, the client's retry
policy, errors as StorageUnavailable, and the API and worker stages on separate directories
sharing only the bucket. A real S3 HTTP server: tests/integration/test_s3_storage.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import boto3
import numpy as np
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from service.auth import authenticate
from service.blobs import S3Blobs, StorageUnavailable, s3_client
from service.config import Settings
from service.db import session_scope
from service.main import create_app
from service.models import Job, JobKind, JobStatus
from service.storage import ArtifactStore
from tests.unit.test_avatars_api import RecordingQueue, face_jpeg, make_key, photos, tiny_png
from workers.runtime import WorkerContext, is_transient

BUCKET = "lpd-test"
TENANT = "7b0f3c1e-4a55-4a8e-9a43-0d1c2b3a4f5e"
AVATAR = "2c9d8e7f-1b2a-4c3d-8e9f-0a1b2c3d4e5f"
OTHER = "9e8d7c6b-5a49-4837-a625-1a2b3c4d5e6f"
DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-64.safetensors"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """moto's S3 with one bucket; fake credentials in the standard chain, no config read."""
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket=BUCKET)
        yield


def s3_settings(root: Path, **overrides: Any) -> Settings:
    return Settings(
        artifacts_dir=root, storage="s3", s3_bucket=BUCKET, s3_region="us-east-1", **overrides
    )


def keys() -> list[str]:
    listing = boto3.client("s3", region_name="us-east-1").list_objects_v2(Bucket=BUCKET)
    return sorted(obj["Key"] for obj in listing.get("Contents", []))


# --- S3Blobs through ArtifactStore ----------------------------------------------------------


def test_what_one_host_pushes_another_pulls(aws: None, tmp_path: Path) -> None:
    api = ArtifactStore.from_settings(s3_settings(tmp_path / "api"))
    worker = ArtifactStore.from_settings(s3_settings(tmp_path / "worker"))
    folder = api.photos_dir(TENANT, AVATAR)
    folder.mkdir(parents=True)
    (folder / "0.jpeg").write_bytes(b"first")
    (folder / "1.png").write_bytes(b"second")
    (folder / ".2.png.0123.partial").write_bytes(b"half")  # temporary: never pushed
    api.push(folder)
    prefix = f"lpd/tenants/{TENANT}/avatars/{AVATAR}/photos/"
    assert keys() == [prefix + "0.jpeg", prefix + "1.png"]

    assert worker.photos(TENANT, AVATAR) == []
    worker.pull_dir(worker.photos_dir(TENANT, AVATAR))
    pulled = worker.photos(TENANT, AVATAR)
    assert [(p.name, p.read_bytes()) for p in pulled] == [
        ("0.jpeg", b"first"),
        ("1.png", b"second"),
    ]

    # The other way, as one file: crops written by the worker, read back by the API host.
    crops = worker.crops_path(TENANT, AVATAR)
    assert not api.pull(api.crops_path(TENANT, AVATAR))  # no such object yet
    images = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    worker.push(worker.write_arrays(crops, images=images))
    assert api.pull(api.crops_path(TENANT, AVATAR))
    with np.load(api.crops_path(TENANT, AVATAR)) as got:
        assert np.array_equal(got["images"], images)
    # Downloads land through a temporary name, renamed: only the planted one is left.
    assert {p.name for p in tmp_path.rglob("*.partial")} == {".2.png.0123.partial"}


def test_a_file_over_the_multipart_threshold_round_trips(aws: None, tmp_path: Path) -> None:
    one = ArtifactStore.from_settings(s3_settings(tmp_path / "one"))
    two = ArtifactStore.from_settings(s3_settings(tmp_path / "two"))
    path = one.finetune_path(TENANT, AVATAR, OTHER)
    path.parent.mkdir(parents=True)
    data = np.random.default_rng(0).bytes(9 * 1024 * 1024)  # boto3 goes multipart at 8 MiB
    path.write_bytes(data)
    one.push(path)
    target = two.finetune_path(TENANT, AVATAR, OTHER)
    assert two.pull(target) and target.read_bytes() == data


def test_drops_delete_only_what_they_name(aws: None, tmp_path: Path) -> None:
    store = ArtifactStore.from_settings(s3_settings(tmp_path))
    for avatar in (AVATAR, OTHER):
        folder = store.photos_dir(TENANT, avatar)
        folder.mkdir(parents=True)
        (folder / "0.png").write_bytes(b"x")
        store.push(folder)
    store.write_arrays(store.crops_path(TENANT, AVATAR), a=np.zeros(1))
    store.push(store.crops_path(TENANT, AVATAR))

    store.drop(store.crops_path(TENANT, AVATAR))
    assert len(keys()) == 2
    store.drop_dir(store.avatar_dir(TENANT, AVATAR))
    store.drop_dir(store.avatar_dir(TENANT, AVATAR))  # idempotent
    assert keys() == [f"lpd/tenants/{TENANT}/avatars/{OTHER}/photos/0.png"]


def test_presigned_url_serves_the_file_inline_under_its_name(aws: None, tmp_path: Path) -> None:
    store = ArtifactStore.from_settings(s3_settings(tmp_path, s3_presign_ttl_s=120))
    path = store.job_dir(TENANT, OTHER) / "video.mp4"
    url = store.download_url(path, "reenactment-x.mp4", "video/mp4")
    assert url is not None
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert parts.path.endswith(f"/lpd/tenants/{TENANT}/jobs/{OTHER}/video.mp4")
    assert query["response-content-disposition"] == 'inline; filename="reenactment-x.mp4"'
    assert query["response-content-type"] == "video/mp4"
    assert query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256" and query["X-Amz-Expires"] == "120"


def test_client_retries_in_standard_mode(aws: None, tmp_path: Path) -> None:
    client = s3_client(s3_settings(tmp_path, s3_endpoint_url="http://127.0.0.1:9000"))
    config = client.meta.config
    # botocore keeps `max_attempts: 5` (retries) as 6 attempts in all
    assert config.retries == {"mode": "standard", "total_max_attempts": 6}
    assert config.signature_version == "s3v4"
    assert config.s3 == {"addressing_style": "path"}  # what MinIO and Ceph expect
    assert client.meta.endpoint_url == "http://127.0.0.1:9000"
    aws_client = s3_client(s3_settings(tmp_path))
    assert aws_client.meta.config.s3 == {"addressing_style": "auto"}


def test_bucket_errors_are_transient_storage_errors(aws: None, tmp_path: Path) -> None:
    blobs = S3Blobs(s3_client(s3_settings(tmp_path)), "no-such-bucket", "lpd/", tmp_path, 60)
    (tmp_path / "a.txt").write_bytes(b"x")
    with pytest.raises(StorageUnavailable) as failure:
        blobs.push("a.txt")
    assert is_transient(failure.value)  # workers retry the task, the API answers 503
    with pytest.raises(StorageUnavailable):
        blobs.pull_dir("photos")


def test_the_local_store_has_no_bucket(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    path = store.crops_path(TENANT, AVATAR)
    store.push(path)  # nothing to do
    assert not store.pull(path)
    store.write_arrays(path, a=np.zeros(1))
    assert store.pull(path)
    assert store.download_url(path, "crops.npz", "application/octet-stream") is None
    store.drop_dir(store.avatar_dir(TENANT, AVATAR))
    assert path.is_file()  # drops touch only a bucket


def test_s3_storage_needs_a_bucket() -> None:
    with pytest.raises(ValidationError, match="s3_bucket"):
        Settings(storage="s3")


# --- the API and workers on separate directories ---------------------------------------------


@pytest.fixture
def api(
    aws: None, db_url: str, tmp_path: Path, sessions: sessionmaker[Session]
) -> Iterator[TestClient]:
    settings = s3_settings(
        tmp_path / "api-host",
        database_url=db_url,
        redis_url="redis://127.0.0.1:1/0",
        required_queues=(),
        base_checkpoint=DEMO,
        photo_face_check=False,
        signed_url_secret="s3cret",
        progress_interval_s=0.0,
    )
    app = create_app(settings)
    app.state.queue = RecordingQueue()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


def test_uploads_are_pushed_and_a_deleted_avatar_leaves_the_bucket(
    api: TestClient, sessions: sessionmaker[Session]
) -> None:
    headers = make_key(sessions, "alice")
    r = api.post("/v1/avatars", files=photos(tiny_png(), tiny_png()), headers=headers)
    assert r.status_code == 202, r.text
    avatar_id = r.json()["avatar"]["id"]
    stored = keys()
    assert len(stored) == 2 and all(f"/avatars/{avatar_id}/photos/" in k for k in stored)

    assert api.delete(f"/v1/avatars/{avatar_id}", headers=headers).status_code == 204
    assert keys() == []


def test_downloads_redirect_to_the_bucket(api: TestClient, sessions: sessionmaker[Session]) -> None:
    headers = make_key(sessions, "alice")
    with session_scope(sessions) as session:
        tenant = authenticate(session, headers["Authorization"]).tenant_id
        job = Job(
            tenant_id=tenant,
            kind=JobKind.REENACT,
            status=JobStatus.SUCCEEDED,
            params={},
            result={"files": {"video": "video.mp4", "mask": "mask.mp4"}},
        )
        session.add(job)
        session.flush()
        job_id = job.id
    store: ArtifactStore = api.app.state.store  # type: ignore[attr-defined]
    video = store.job_dir(tenant, job_id) / "video.mp4"
    video.parent.mkdir(parents=True)
    video.write_bytes(b"\x00\x00\x00\x18ftypmp42")
    store.push(video)
    video.unlink()  # the API host keeps no copy: the bucket serves it

    result = api.get(f"/v1/jobs/{job_id}", headers=headers).json()["result"]
    for url, auth in ((result["video"], headers), (result["video_url"], {})):
        r = api.get(url, headers=auth, follow_redirects=False)
        assert r.status_code == 307, r.text
        location = urlsplit(r.headers["location"])
        assert location.path.endswith(f"/jobs/{job_id}/video.mp4")
        query = parse_qs(location.query)
        assert query["response-content-disposition"] == [
            f'inline; filename="reenactment-{job_id}.mp4"'
        ]
        assert query["response-content-type"] == ["video/mp4"]


@pytest.mark.slow
def test_worker_stages_pull_inputs_and_push_outputs(
    api: TestClient, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Preprocess on one worker host, fine-tune on another: each starts from the bucket."""
    from workers.finetune import finetune_job
    from workers.preprocess import preprocess_job

    headers = make_key(sessions, "alice")
    data = {"fine_tune": "light", "steps": "2"}
    r = api.post("/v1/avatars", files=photos(face_jpeg()), data=data, headers=headers)
    assert r.status_code == 202, r.text
    job_id, avatar_id = r.json()["job"]["id"], r.json()["avatar"]["id"]
    settings: Settings = api.app.state.settings  # type: ignore[attr-defined]

    def host(name: str) -> WorkerContext:
        on_host = settings.model_copy(update={"artifacts_dir": tmp_path / name})
        store = ArtifactStore.from_settings(on_host)
        return WorkerContext(on_host, sessions, store, RecordingQueue())

    preprocess_job(host("cpu-host"), job_id, embed=lambda crops: np.ones(8, np.float32))
    assert any(k.endswith(f"/avatars/{avatar_id}/crops.npz") for k in keys())

    finetune_job(host("gpu-host"), job_id)
    with session_scope(sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.SUCCEEDED, job.error_message
        artifact = str((job.result or {})["artifact"])
    assert {f"lpd/{artifact}", f"lpd/{artifact.removesuffix('.safetensors')}.png"} <= set(keys())
