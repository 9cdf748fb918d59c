"""The demo page's vendored browser libraries (web/, `make web`, served at /vendor): exact
npm pins, the files the page loads, and a typed 404 that says what to run when they were
never built."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import service.main
from service.config import Settings
from service.main import STATIC_DIR, VENDOR_DIR, create_app

ROOT = Path(__file__).resolve().parents[2]
WEB = ROOT / "web"
BUILT = (VENDOR_DIR / "manifest.json").is_file()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_client(db_url: str) -> TestClient:
    settings = Settings(
        database_url=db_url,
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        triton_url=f"127.0.0.1:{closed_port()}",
        readiness_timeout_s=1.0,
        required_queues=(),
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    with make_client(db_url) as c:
        yield c


def test_npm_dependencies_are_pinned_exactly_and_locked() -> None:
    package = json.loads((WEB / "package.json").read_text())
    lock = json.loads((WEB / "package-lock.json").read_text())
    deps = package["dependencies"]
    assert set(deps) == {"onnxruntime-web", "@mediapipe/tasks-vision"}
    for name, version in deps.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}: pin an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version
    assert lock["packages"][""]["dependencies"] == deps  # the lock is of this package.json


def test_the_page_loads_only_what_the_build_copies() -> None:
    """Every /vendor path the page or the build's manifest names is a file build.mjs writes."""
    build = (WEB / "build.mjs").read_text()
    copied = {
        f"/vendor/{folder}/{file.rsplit('/', 1)[-1]}"
        for _, file, folder in re.findall(r'\["([^"]+)", "([^"]+)", "([^"]+)"\]', build)
    }
    assert "/vendor/ort/ort-wasm-simd-threaded.wasm" in copied
    assert "/vendor/tasks-vision/wasm/vision_wasm_internal.wasm" in copied
    page = (STATIC_DIR / "pose.js").read_text() + (STATIC_DIR / "app.js").read_text()
    assert "/vendor/manifest.json" in page
    # The page takes every other path from the manifest, which names only copied files.
    named = set(re.findall(r"/vendor/[\w./-]+", build))
    folders = {p.rsplit("/", 1)[0] + "/" for p in copied}
    for path in named - {"/vendor/models/"}:
        assert path in copied or path in folders or path.rstrip("/") + "/" in folders, path


@pytest.mark.skipif(not BUILT, reason="web/dist is not built (make web)")
def test_built_files_are_served(client: TestClient) -> None:
    r = client.get("/vendor/manifest.json")
    assert r.status_code == 200
    manifest = r.json()
    package = json.loads((WEB / "package.json").read_text())
    assert manifest["versions"] == package["dependencies"]
    for key in ("ort", "tasks_vision", "face_model"):
        assert client.head(manifest[key]).status_code == 200, manifest[key]
    wasm = client.get(manifest["ort_wasm"] + "ort-wasm-simd-threaded.wasm")
    assert wasm.status_code == 200
    assert wasm.headers["content-type"] == "application/wasm"  # streaming compilation
    assert wasm.content[:4] == b"\0asm"
    module = client.get(manifest["ort"])
    assert module.headers["content-type"].split(";")[0] in {
        "text/javascript",
        "application/javascript",
    }
    text = client.get("/metrics").text
    assert 'route="/vendor",status="200"' in text


def test_unbuilt_vendor_files_are_a_typed_404(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service.main, "VENDOR_DIR", tmp_path / "not-built")
    with make_client(db_url) as client:
        r = client.get("/vendor/manifest.json")
        assert r.status_code == 404
        error = r.json()["error"]
        assert error["code"] == "web_not_built"
        assert "make web" in error["message"]
        assert client.get("/").status_code == 200  # the rest of the page still works
        assert not [p for p in client.get("/openapi.json").json()["paths"] if "vendor" in p]
