"""Session fixtures for integration tests: a real tritonserver serving the demo checkpoint."""

from __future__ import annotations

import json
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from sqlalchemy import text

from deploy.triton.export import RepositoryConfig, build_repository
from deploy.triton.serve import ServerConfig, TritonServer, free_port
from service.db import create_db_engine, migrate
from service.triton import TritonBackend, TritonConfig

DEMO = Path(__file__).resolve().parents[2] / "checkpoints" / "demo-tiny-64.safetensors"
POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@contextmanager
def postgres_schema(prefix: str = "lpd_test") -> Iterator[str]:
    """A URL to a migrated, empty schema of its own in database `test` (via search_path),
    dropped with everything in it afterwards, so reruns and parallel runs start clean."""
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = create_db_engine(POSTGRES)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = f"{POSTGRES}?options=-csearch_path%3D{schema}"
        migrate(url)
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class Triton:
    server: TritonServer
    repository: Path
    avatar_dir: Path
    backend: TritonBackend

    def get_json(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://{self.server.http_url}{path}", timeout=10) as r:
            return json.loads(r.read())

    def metrics(self) -> dict[str, float]:
        """Prometheus text -> {'name{labels}': value}."""
        with urllib.request.urlopen(f"http://{self.server.metrics_url}/metrics", timeout=10) as r:
            text = r.read().decode()
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                values[key] = float(value)
        return values


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Triton]:
    """The python-flavour repository of the demo checkpoint, one instance per model, a 1 MiB
    avatar cache (so a second avatar evicts the first), fine-tuned avatars from avatar_dir."""
    root = tmp_path_factory.mktemp("triton")
    avatar_dir = root / "avatars"
    avatar_dir.mkdir()
    repo = RepositoryConfig(threads=1, avatar_dir=avatar_dir, avatar_cache_mb=1.0)
    repository = build_repository(DEMO, root / "repository", repo)
    http, grpc, metrics = free_port(), free_port(), free_port()
    config = ServerConfig(repository, http_port=http, grpc_port=grpc, metrics_port=metrics)
    with TritonServer(config) as server:
        backend = TritonBackend(TritonConfig(url=server.grpc_url, timeout_s=30))
        yield Triton(server, repository, avatar_dir, backend)
        backend.close()
