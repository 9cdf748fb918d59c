"""storage=s3 over HTTP: the API host and the worker host keep separate artifact directories
and share only the bucket. The API pushes the upload, the reenact worker pulls it (and a
fine-tuned avatar's weights) and pushes the result before the job succeeds, downloads answer
307 to a presigned URL that serves a decodable MP4, expiry deletes the bucket's copy.

No MinIO binary is available offline: moto's ThreadedMotoServer speaks the S3 HTTP API
(SigV4, multipart, presigned GETs with response-header overrides) on a local port, so boto3
and urllib talk to it over HTTP as they would to MinIO. Triton is the session `triton`.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import boto3
import numpy as np
import pytest
from moto.server import ThreadedMotoServer
from sqlalchemy.orm import Session, sessionmaker

from deploy.triton.serve import free_port
from media.video import probe, read_frames
from service.config import Settings
from service.db import create_db_engine, create_session_factory, migrate
from service.models import utcnow
from service.storage import ArtifactStore
from tests.integration.conftest import Triton
from tests.integration.test_reenact_worker import (  # reuse the stage's fixtures
    FPS,
    FRAMES,
    Stack,
    _finetuned,
    driver,  # noqa: F401
    identity,  # noqa: F401
)
from workers.maintenance import expire_results
from workers.reenact import reenact_job
from workers.runtime import WorkerContext

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BUCKET = "lpd-artifacts"


@dataclass
class Bucket:
    endpoint: str

    def objects(self) -> list[str]:
        client = boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1")
        listing = client.list_objects_v2(Bucket=BUCKET)
        return sorted(obj["Key"] for obj in listing.get("Contents", []))


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Bucket]:
    """An S3 HTTP server on a free port with one bucket; credentials in the standard chain."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{port}"
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(
            Bucket=BUCKET
        )
        yield Bucket(endpoint)
    finally:
        server.stop()


@dataclass
class Hosts:
    api: Stack  # the API app, its store on api-host/
    worker: WorkerContext  # its store on worker-host/


@pytest.fixture
def hosts(triton: Triton, bucket: Bucket, tmp_path: Path) -> Iterator[Hosts]:
    url = f"sqlite:///{tmp_path / 'lpd.db'}"
    migrate(url)
    settings = Settings(
        database_url=url,
        artifacts_dir=tmp_path / "api-host",
        served_avatars_dir=triton.avatar_dir,  # Triton's volume: shared in any deployment
        redis_url="redis://127.0.0.1:1/0",
        triton_url=triton.server.grpc_url,
        triton_timeout_s=60,
        required_queues=(),
        progress_interval_s=0.0,
        reenact_batch=8,
        signed_url_secret="s3cret",
        storage="s3",
        s3_bucket=BUCKET,
        s3_endpoint_url=bucket.endpoint,
        s3_region="us-east-1",
    )
    engine = create_db_engine(url)
    sessions: sessionmaker[Session] = create_session_factory(engine)
    api = Stack(settings, sessions)
    on_worker = settings.model_copy(update={"artifacts_dir": tmp_path / "worker-host"})
    worker = WorkerContext(on_worker, sessions, ArtifactStore.from_settings(on_worker), api.queue)
    yield Hosts(api, worker)
    api.client.__exit__(None, None, None)
    engine.dispose()


def test_a_reenactment_travels_through_the_bucket(
    hosts: Hosts,
    bucket: Bucket,
    driver: bytes,  # noqa: F811
    identity: np.ndarray,  # noqa: F811
    tmp_path: Path,
) -> None:
    api = hosts.api
    job_id = api.submit(driver, avatar_id=api.avatar(identity))
    assert [k for k in bucket.objects() if f"/jobs/{job_id}/input/" in k]  # pushed by the API
    assert not (tmp_path / "worker-host").exists()  # the worker has only the bucket

    reenact_job(hosts.worker, job_id)
    job = api.job(job_id)
    assert job["status"] == "succeeded", job
    assert not list((tmp_path / "api-host").rglob("video.mp4"))  # rendered elsewhere
    pushed = {k.rsplit("/", 1)[1] for k in bucket.objects() if f"/jobs/{job_id}/" in k}
    assert {"video.mp4", "mask.mp4"} <= pushed

    # Both download routes redirect; the presigned URL serves the video inline, under its name.
    bodies = []
    for url, headers in ((job["result"]["video"], api.headers), (job["result"]["video_url"], {})):
        r = api.client.get(url, headers=headers, follow_redirects=False)
        assert r.status_code == 307, r.text
        with urllib.request.urlopen(r.headers["location"], timeout=30) as response:
            assert response.headers["Content-Type"] == "video/mp4"
            disposition = f'inline; filename="reenactment-{job_id}.mp4"'
            assert response.headers["Content-Disposition"] == disposition
            bodies.append(response.read())
    assert bodies[0] == bodies[1]
    video = tmp_path / "out.mp4"
    video.write_bytes(bodies[0])
    info = probe(video)
    assert (info.num_frames, info.fps, info.audio_codec) == (FRAMES, FPS, "aac")
    assert len(list(read_frames(video))) == FRAMES

    # Expiry removes the bucket's copy too; the link then says so.
    assert expire_results(api.sessions, hosts.worker.store, utcnow() + timedelta(days=1)) == 1
    assert not [k for k in bucket.objects() if f"/jobs/{job_id}/" in k]
    gone = api.client.get(job["result"]["video"], headers=api.headers, follow_redirects=False)
    assert gone.status_code == 410


def test_a_finetuned_avatar_is_pulled_before_it_is_served(
    hosts: Hosts,
    triton: Triton,
    driver: bytes,  # noqa: F811
    identity: np.ndarray,  # noqa: F811
    tmp_path: Path,
) -> None:
    api = hosts.api
    avatar_id = api.avatar(identity, _finetuned(tmp_path))  # written on the API host...
    store = api.client.app.state.store  # type: ignore[attr-defined]
    weights = next((tmp_path / "api-host").rglob("*.safetensors"))
    store.push(weights)  # ...and in the bucket, as a fine-tune worker leaves it
    job_id = api.submit(driver, avatar_id=avatar_id)
    reenact_job(hosts.worker, job_id)
    assert api.job(job_id)["status"] == "succeeded"
    assert (triton.avatar_dir / weights.name).is_file()
    pulled = hosts.worker.store.root / store.relative(weights)
    assert pulled.read_bytes() == weights.read_bytes()
