"""The demo page (`/`, service/static) with TestClient: served, self-contained (no CDN), its
element ids in place, and the API, /docs and the route metrics unaffected."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from fastapi.testclient import TestClient

from service.config import Settings
from service.main import STATIC_DIR, create_app

# The ids the page's script and the browser test rely on.
IDS = {
    "api-key",
    "save-key",
    "key-status",
    "error",
    "avatar-form",
    "photo-input",
    "avatar-name",
    "fine-tune",
    "steps",
    "create-avatar",
    "avatar-progress",
    "avatar-status",
    "avatar-select",
    "refresh-avatars",
    "reenact-form",
    "driver-source-file",
    "driver-source-webcam",
    "driver-input",
    "record-start",
    "record-stop",
    "webcam-preview",
    "output",
    "paste-back",
    "keep-audio",
    "background",
    "background-color",
    "background-image",
    "submit-reenactment",
    "reenact-progress",
    "reenact-status",
    "result-video",
    "download-video",
    "download-mask",
    "live-start",
    "live-stop",
    "live-camera",
    "live-canvas",
    "live-latency",
    "live-dropped",
    "live-mode",
    "pose-precision",
    "pose-crop",
    "live-bytes",
    "live-encoder",
    "live-render",
    "live-overlay",
    "pose-crop-preview",
}
FORM_CONTROLS = {"input", "select", "textarea"}


class PageParser(HTMLParser):
    """Element ids, the ids that <label for> names, form controls, and asset links."""

    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.label_for: set[str] = set()
        self.controls: dict[str, dict[str, str | None]] = {}
        self.assets: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids.append(str(a["id"]))
        if tag == "label" and a.get("for"):
            self.label_for.add(str(a["for"]))
        if tag in FORM_CONTROLS and a.get("id"):
            self.controls[str(a["id"])] = a
        if tag == "script" and a.get("src"):
            self.assets.append(str(a["src"]))
        if tag == "link" and a.get("href") and not str(a["href"]).startswith("data:"):
            self.assets.append(str(a["href"]))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    settings = Settings(
        database_url=db_url,
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        triton_url=f"127.0.0.1:{closed_port()}",
        readiness_timeout_s=1.0,
        required_queues=(),
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def page(client: TestClient) -> PageParser:
    r = client.get("/")
    assert r.status_code == 200, r.text
    parser = PageParser()
    parser.feed(r.text)
    return parser


def test_root_serves_the_page(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"  # a new deploy shows at once
    assert "<title>" in r.text


def test_the_page_has_the_ids_and_labels(page: PageParser) -> None:
    assert not IDS - set(page.ids), IDS - set(page.ids)
    assert len(page.ids) == len(set(page.ids)), "duplicate ids"
    # Every visible form control has a <label for> (or an aria-label).
    unlabeled = [
        i
        for i, a in page.controls.items()
        if a.get("type") != "hidden" and i not in page.label_for and not a.get("aria-label")
    ]
    assert not unlabeled


def test_the_script_only_names_ids_that_exist(page: PageParser) -> None:
    script = (STATIC_DIR / "app.js").read_text()
    named = set(re.findall(r'\$\("([a-z0-9-]+)"\)', script))
    assert named, "the pattern no longer matches app.js"
    assert named <= set(page.ids), named - set(page.ids)
    # `${prefix}-job` and friends, for prefix avatar and reenact
    for prefix in ("avatar", "reenact"):
        for suffix in ("job", "progress", "status", "cancel"):
            assert f"{prefix}-{suffix}" in page.ids


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/static/index.html", "text/html"),
        ("/static/app.js", "text/javascript"),
        ("/static/pose.js", "text/javascript"),
        ("/static/style.css", "text/css"),
    ],
)
def test_static_files_have_their_content_types(
    client: TestClient, path: str, content_type: str
) -> None:
    r = client.get(path)
    assert r.status_code == 200
    assert r.headers["content-type"].split(";")[0] in {
        content_type,
        content_type.replace("text/", "application/"),
    }
    assert r.content == (STATIC_DIR / path.removeprefix("/static/")).read_bytes()


def test_the_page_links_only_its_own_assets(client: TestClient, page: PageParser) -> None:
    assert sorted(page.assets) == ["/static/app.js", "/static/pose.js", "/static/style.css"]
    for asset in page.assets:
        assert client.get(asset).status_code == 200


def test_no_external_urls_in_the_assets() -> None:
    files = sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())
    assert {p.name for p in files} == {"index.html", "app.js", "pose.js", "style.css"}
    for path in files:
        text = path.read_text()
        assert not re.search(r"https?://", text), path.name
        assert "//cdn" not in text and "@import" not in text, path.name


def test_a_missing_static_file_is_a_typed_404(client: TestClient) -> None:
    r = client.get("/static/nope.js")
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "not_found"


def test_docs_and_api_routes_are_unaffected(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "/" not in spec["paths"]
    assert not [p for p in spec["paths"] if p.startswith("/static")]
    assert "/v1/avatars" in spec["paths"] and "/v1/jobs/{job_id}" in spec["paths"]
    assert client.get("/healthz").status_code == 200
    r = client.get("/v1/avatars")
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "unauthorized"
    assert client.post("/").status_code == 405


def test_the_page_is_counted_by_route_not_as_unmatched(client: TestClient) -> None:
    client.get("/")
    client.get("/static/app.js")
    client.get("/static/style.css")
    text = client.get("/metrics").text
    assert 'lpd_http_requests_total{method="GET",route="/",status="200"} 1.0' in text
    assert 'lpd_http_requests_total{method="GET",route="/static",status="200"} 2.0' in text
    assert "<unmatched>" not in text
    assert "app.js" not in text
