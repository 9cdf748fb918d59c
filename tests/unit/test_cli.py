"""The `reenact` CLI against a real API server (uvicorn in a thread, SQLite; the job queue
is a recorder and the test plays the worker's part by moving jobs in the database), and
`reenact local` running the demo checkpoint on the sample files."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from cli.main import main
from media.video import probe
from service.auth import create_api_key, create_tenant
from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.main import create_app
from service.models import Avatar, AvatarStatus, Job, JobStatus
from tests.live_server import serve
from tests.unit.test_avatars_api import RecordingQueue

ROOT = Path(__file__).resolve().parents[2]
PHOTO, DRIVER = ROOT / "samples" / "photo.jpg", ROOT / "samples" / "driver.mp4"


class Api:
    def __init__(self, url: str, key: str, sessions: sessionmaker[Session], root: Path) -> None:
        self.url, self.key, self.sessions, self.root = url, key, sessions, root

    def run(self, *args: str, key: str | None = None) -> int:
        return main(["--url", self.url, "--key", key or self.key, "--quiet", *args])

    def later(self, fn: Callable[[], None], delay_s: float = 0.5) -> threading.Thread:
        """Play the worker: run `fn` shortly, while the CLI polls."""

        def go() -> None:
            time.sleep(delay_s)
            fn()

        thread = threading.Thread(target=go)
        thread.start()
        return thread

    def latest_job(self) -> str:
        with session_scope(self.sessions) as session:
            job = session.query(Job).order_by(Job.created_at.desc()).first()
            assert job is not None
            return job.id

    def finish(self, job_id: str, *, result: dict | None = None, error: str | None = None) -> None:
        with session_scope(self.sessions) as session:
            transition(session, job_id, JobStatus.RUNNING)
            if error:
                transition(session, job_id, JobStatus.FAILED, error_code=error, error_message="x")
            else:
                transition(session, job_id, JobStatus.SUCCEEDED, result=result or {})
            job = session.get(Job, job_id)
            avatar = session.get(Avatar, job.avatar_id) if job and job.avatar_id else None
            if avatar is not None and not error:
                avatar.status, avatar.identity_embedding = AvatarStatus.READY, b"\0" * 32


@pytest.fixture
def api(db_url: str, sessions: sessionmaker[Session], tmp_path: Path) -> Iterator[Api]:
    settings = Settings(
        database_url=db_url,
        artifacts_dir=tmp_path / "artifacts",
        redis_url="redis://127.0.0.1:1/0",
        required_queues=(),
        photo_face_check=False,
    )
    app = create_app(settings)
    app.state.queue = RecordingQueue()
    with session_scope(sessions) as session:
        key, _ = create_api_key(session, create_tenant(session, "acme"), "cli")
    with serve(app) as url:
        yield Api(url, key, sessions, settings.artifacts_dir)


def test_avatar_create_waits_for_its_job(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    waiter = api.later(lambda: api.finish(api.latest_job()), delay_s=1.0)
    assert api.run("avatar", "create", str(PHOTO), "--name", "ada") == 0
    waiter.join()
    avatar_id = capsys.readouterr().out.strip()
    assert api.run("avatar", "list") == 0
    listing = capsys.readouterr().out
    assert avatar_id in listing and "ready" in listing and "ada" in listing


def test_video_downloads_the_result(api: Api, tmp_path: Path) -> None:
    assert api.run("avatar", "create", str(PHOTO), "--no-wait") == 0
    api.finish(api.latest_job())
    with session_scope(api.sessions) as session:
        avatar_id = session.query(Avatar).one().id

    def render() -> None:  # what the reenact worker would write
        job_id = api.latest_job()
        with session_scope(api.sessions) as session:
            job = session.get(Job, job_id)
            assert job is not None
            folder = api.root / "tenants" / job.tenant_id / "jobs" / job_id
        (folder / "video.mp4").write_bytes(DRIVER.read_bytes())
        (folder / "mask.mp4").write_bytes(b"matte")
        files = {"video": "video.mp4", "mask": "mask.mp4"}
        api.finish(job_id, result={"files": files, "frames": 50, "fps": 25.0})

    worker = api.later(render)
    out, matte = tmp_path / "out.mp4", tmp_path / "matte.mp4"
    code = api.run(
        "video", str(DRIVER), "--avatar", avatar_id, "-o", str(out), "--mask", str(matte)
    )
    worker.join()
    assert code == 0
    assert out.read_bytes() == DRIVER.read_bytes() and matte.read_bytes() == b"matte"


def test_errors_are_one_line_with_a_hint(api: Api, capsys: pytest.CaptureFixture[str]) -> None:
    assert api.run("avatar", "list", key="lpd_nope_nope") == 1
    err = capsys.readouterr().err
    assert "error: unauthorized" in err and "hint: check --key" in err

    assert api.run("avatar", "create", str(PHOTO), "--no-wait") == 0
    job_id = api.latest_job()
    api.finish(job_id, error="no_face")
    capsys.readouterr()
    assert api.run("job", "wait", job_id) == 1
    err = capsys.readouterr().err
    assert "error: no_face" in err and "hint:" in err

    missing = "00000000-0000-4000-8000-000000000000"
    assert api.run("video", str(DRIVER), "--avatar", missing, "-o", "/tmp/x.mp4") == 1
    assert "error: avatar_not_found" in capsys.readouterr().err

    assert main(["--url", "http://127.0.0.1:1", "--key", "k", "avatar", "list"]) == 1
    assert "cannot reach" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        api.run("video", "no-such-file.mp4", "--avatar", missing, "-o", "x.mp4")
    assert usage.value.code == 2


@pytest.mark.slow
def test_local_mode_renders_without_a_server(tmp_path: Path) -> None:
    out = tmp_path / "local.mp4"
    assert main(["--quiet", "local", str(DRIVER), "--photos", str(PHOTO), "-o", str(out)]) == 0
    info, driver = probe(out), probe(DRIVER)
    assert (info.num_frames, info.width, info.fps) == (driver.num_frames, 64, driver.fps)
    assert info.audio_codec == "aac"
