"""The reenact stage against a real tritonserver (the session `triton` fixture, demo
checkpoint, 64 px): real driver videos with audio encoded and decoded by PyAV, every output
option, a fine-tuned avatar served by key, typed failures, cancel mid-render.

The stage is called directly (no broker); the Celery path is in tests/e2e."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from media.crop import crop_face
from media.faces import FaceDetector
from media.video import probe, read_frames
from service.auth import authenticate, create_api_key, create_tenant
from service.config import Settings
from service.db import create_db_engine, create_session_factory, migrate, session_scope
from service.jobs import transition
from service.main import create_app
from service.models import Avatar, AvatarStatus, Job, JobStatus
from service.storage import ArtifactStore
from service.triton import Rendered, TritonBackend
from tests.integration.conftest import DEMO, Triton
from tests.integration.test_triton_serving import NO_VGG
from tests.media_samples import astronaut, encode_clip, panning_frames, tone
from tests.unit.test_avatars_api import RecordingQueue
from training.finetune import FinetuneConfig, finetune
from training.synthetic import identity_for, poses_for, render
from workers.reenact import reenact_job
from workers.runtime import JobFailure, WorkerContext

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FRAMES, FPS, SIDE = 20, 10, 160  # a 2 s driver


@pytest.fixture(scope="module")
def driver(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("driver") / "driver.mp4"
    frames = panning_frames(FRAMES, size=SIDE)
    return encode_clip(path, frames, fps=FPS, audio=tone(FRAMES / FPS)).read_bytes()


@pytest.fixture(scope="module")
def identity(triton: Triton) -> np.ndarray:
    photo = astronaut()
    crop = crop_face(photo, FaceDetector().crop_box(photo), 64).image
    return triton.backend.embed_identity(crop.transpose(2, 0, 1)[None].copy())


class Stack:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self.queue = RecordingQueue()
        app = create_app(settings)
        app.state.queue = self.queue
        self.client = TestClient(app)
        self.client.__enter__()  # runs the lifespan (database engine, ...)
        with session_scope(sessions) as session:
            key, _ = create_api_key(session, create_tenant(session, "acme"), "test")
        self.headers = {"Authorization": f"Bearer {key}"}
        self.ctx = WorkerContext(
            settings, sessions, ArtifactStore(settings.artifacts_dir), self.queue
        )

    def avatar(self, identity: np.ndarray, artifact: Path | None = None) -> str:
        with session_scope(self.sessions) as session:
            tenant = authenticate(session, self.headers["Authorization"]).tenant_id
            avatar = Avatar(
                tenant_id=tenant,
                name="ada",
                status=AvatarStatus.READY,
                identity_embedding=identity.astype("<f4").tobytes(),
            )
            session.add(avatar)
            session.flush()
            if artifact is not None:
                store = self.ctx.store
                target = store.finetune_path(tenant, avatar.id, avatar.id)
                target.parent.mkdir(parents=True)
                target.write_bytes(artifact.read_bytes())
                avatar.artifact_path = store.relative(target)
            return avatar.id

    def submit(self, video: bytes, **fields: Any) -> str:
        data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in fields.items()}
        files = [("video", ("d.mp4", video, "video/mp4"))]
        r = self.client.post("/v1/reenactments", files=files, data=data, headers=self.headers)
        assert r.status_code == 202, r.text
        return str(r.json()["id"])

    def job(self, job_id: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/jobs/{job_id}", headers=self.headers).json())

    def download(self, url: str, to: Path) -> Path:
        r = self.client.get(url, headers=self.headers)
        assert r.status_code == 200, r.text
        to.write_bytes(r.content)
        return to


@pytest.fixture
def stack(triton: Triton, tmp_path: Path) -> Iterator[Stack]:
    url = f"sqlite:///{tmp_path / 'lpd.db'}"
    migrate(url)
    settings = Settings(
        database_url=url,
        artifacts_dir=tmp_path / "artifacts",
        served_avatars_dir=triton.avatar_dir,
        redis_url="redis://127.0.0.1:1/0",
        triton_url=triton.server.grpc_url,
        triton_timeout_s=60,
        required_queues=(),
        progress_interval_s=0.0,
        reenact_batch=8,
        signed_url_secret="s3cret",
    )
    engine = create_db_engine(url)
    stack = Stack(settings, create_session_factory(engine))
    yield stack
    stack.client.__exit__(None, None, None)
    engine.dispose()


def audio_seconds(path: Path) -> float:
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        last = max(
            float((p.pts + (p.duration or 0)) * p.time_base)
            for p in container.demux(stream)
            if p.pts is not None
        )
        return last - float((stream.start_time or 0) * stream.time_base)


def test_mp4_keeps_every_frame_and_the_audio(
    stack: Stack, driver: bytes, identity: np.ndarray, tmp_path: Path
) -> None:
    job_id = stack.submit(driver, avatar_id=stack.avatar(identity))
    reenact_job(stack.ctx, job_id)
    job = stack.job(job_id)
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["result"]["frames"] == FRAMES
    video = stack.download(job["result"]["video"], tmp_path / "out.mp4")
    info = probe(video)
    assert (info.num_frames, info.width, info.height, info.fps) == (FRAMES, 64, 64, FPS)
    assert info.audio_codec == "aac"
    assert abs(audio_seconds(video) - FRAMES / FPS) < 0.1
    frames = [f.image for f in read_frames(video)]
    assert np.std(np.stack(frames)) > 5  # a rendered head, not a blank
    mask = stack.download(job["result"]["mask"], tmp_path / "mask.mp4")
    assert probe(mask).num_frames == FRAMES and not probe(mask).has_audio
    # The signed link serves the same bytes without the key.
    signed = stack.client.get(job["result"]["video_url"])
    assert signed.status_code == 200 and signed.content == video.read_bytes()


def test_webm_alpha_pasted_back_at_driver_size(
    stack: Stack, driver: bytes, identity: np.ndarray, tmp_path: Path
) -> None:
    job_id = stack.submit(driver, avatar_id=stack.avatar(identity), output="webm", paste_back=True)
    reenact_job(stack.ctx, job_id)
    job = stack.job(job_id)
    assert job["status"] == "succeeded", job
    video = stack.download(job["result"]["video"], tmp_path / "out.webm")
    info = probe(video)
    assert (info.num_frames, info.width, info.height) == (FRAMES, SIDE, SIDE)
    assert info.audio_codec == "opus"
    rgba = np.stack([f.image for f in read_frames(video, alpha=True)])
    assert rgba.shape == (FRAMES, SIDE, SIDE, 4)
    alpha = rgba[..., 3]
    assert alpha.max() > 200 and alpha.min() < 10  # a head over a transparent frame
    assert alpha[:, 0, :].mean() < 5  # the top edge is outside the x1.8 crop's head


def test_mask_only_and_a_colour_background(
    stack: Stack, driver: bytes, identity: np.ndarray, tmp_path: Path
) -> None:
    avatar = stack.avatar(identity)
    mask_job = stack.submit(driver, avatar_id=avatar, output="mask", paste_back=True)
    colour_job = stack.submit(
        driver, avatar_id=avatar, background="color", background_color="#ff0000"
    )
    for job_id in (mask_job, colour_job):
        reenact_job(stack.ctx, job_id)
    masked = stack.job(mask_job)["result"]
    assert masked["video"] is None and masked["mask"]
    matte = stack.download(masked["mask"], tmp_path / "m.mp4")
    assert (probe(matte).width, probe(matte).num_frames) == (SIDE, FRAMES)

    coloured = stack.job(colour_job)["result"]
    frames = np.stack(
        [f.image for f in read_frames(stack.download(coloured["video"], tmp_path / "c.mp4"))]
    )
    mattes = np.stack(
        [
            f.image[..., 0]
            for f in read_frames(stack.download(coloured["mask"], tmp_path / "cm.mp4"))
        ]
    )
    background = frames[mattes < 10].astype(np.float32)
    assert len(background) > 0
    assert np.abs(background.mean(axis=0) - [255, 0, 0]).max() < 40  # H.264 bleeds a little


def test_finetuned_avatar_is_published_and_served_by_key(
    stack: Stack, driver: bytes, identity: np.ndarray, tmp_path: Path, triton: Triton
) -> None:
    avatar = stack.avatar(identity, _finetuned(tmp_path))
    job_id = stack.submit(driver, avatar_id=avatar)
    reenact_job(stack.ctx, job_id)
    assert stack.job(job_id)["status"] == "succeeded"
    # Published under the fine-tune's key, for the server to load on demand.
    with session_scope(stack.sessions) as session:
        stored = session.get(Avatar, avatar)
        assert stored is not None and stored.artifact_path is not None
        key = Path(stored.artifact_path).stem
    assert (triton.avatar_dir / f"{key}.safetensors").is_file()
    # Deleting the avatar withdraws its weights from Triton too (a hard link would keep them).
    assert stack.client.delete(f"/v1/avatars/{avatar}", headers=stack.headers).status_code == 204
    assert not (triton.avatar_dir / f"{key}.safetensors").exists()


def _finetuned(tmp_path: Path) -> Path:
    """A light avatar after 2 fine-tune steps (pixel loss only: no VGG weights here)."""
    shots = [render(identity_for(5, 0), p, 64) for p in poses_for(5, 0, 0, 2)]
    result = finetune(
        DEMO,
        np.stack([s.image for s in shots]),
        np.stack([s.mask for s in shots]),
        tmp_path / "light.safetensors",
        FinetuneConfig(mode="light", steps=2, losses=NO_VGG),
    )
    return Path(result.avatar)


def test_no_face_fails_typed(stack: Stack, identity: np.ndarray, tmp_path: Path) -> None:
    blank = [np.full((96, 96, 3), 128, np.uint8) for _ in range(5)]
    video = encode_clip(tmp_path / "blank.mp4", blank, fps=5).read_bytes()
    job_id = stack.submit(video, avatar_id=stack.avatar(identity))
    with pytest.raises(JobFailure) as failure:
        reenact_job(stack.ctx, job_id)
    assert failure.value.code == "no_face"


class CancelAfterFirstBatch:
    """The real backend; the user cancels the job while the first batch renders."""

    def __init__(self, backend: TritonBackend, stack: Stack, job_id: str) -> None:
        self.backend, self.stack, self.job_id = backend, stack, job_id

    def image_size(self) -> int:
        return self.backend.image_size()

    def reenact(self, frames: np.ndarray, **kw: Any) -> Rendered:
        out = self.backend.reenact(frames, **kw)
        with session_scope(self.stack.sessions) as session:
            transition(session, self.job_id, JobStatus.CANCELED, stage="canceled")
        return out


def test_cancel_mid_render_leaves_no_files(
    stack: Stack, driver: bytes, identity: np.ndarray, triton: Triton
) -> None:
    job_id = stack.submit(driver, avatar_id=stack.avatar(identity))
    backend = CancelAfterFirstBatch(triton.backend, stack, job_id)
    reenact_job(stack.ctx, job_id, backend=backend)  # type: ignore[arg-type]
    assert stack.job(job_id)["status"] == "canceled"
    with session_scope(stack.sessions) as session:
        job = session.get(Job, job_id)
        assert job is not None
        folder = stack.ctx.store.job_dir(job.tenant_id, job_id)
    assert sorted(p.name for p in folder.iterdir()) == ["input"]  # no result, no .partial
