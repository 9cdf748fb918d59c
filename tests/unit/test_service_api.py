"""The HTTP foundation with TestClient: auth, typed errors, readiness, metrics, admin CLI.

SQLite in tmp_path; Redis and Triton point at closed ports (readiness must say so).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, field_validator
from sqlalchemy.orm import Session, sessionmaker

from service import admin
from service.api.deps import PrincipalDep, get_settings
from service.api.routes import health
from service.auth import (
    AuthenticationError,
    authenticate,
    create_api_key,
    create_tenant,
    revoke_api_key,
)
from service.config import Settings
from service.db import session_scope
from service.errors import ApiError
from service.main import create_app
from service.models import ApiKey


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def settings(db_url: str) -> Settings:
    return Settings(
        database_url=db_url,
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        triton_url=f"127.0.0.1:{closed_port()}",
        readiness_timeout_s=1.0,
        retry_after_s=7,
        required_queues=(),  # no workers here; tests/unit/test_avatars_api.py checks them
    )


class Item(BaseModel):
    name: str
    size: int

    @field_validator("name")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("name is blank")
        return v


def probe_router() -> APIRouter:
    """Routes that exercise the error handlers; mounted only in these tests."""
    router = APIRouter(prefix="/probe")

    @router.post("/items/{item_id}")
    def post_item(item_id: int, item: Item) -> dict[str, int]:
        return {"id": item_id}

    @router.get("/conflict")
    def conflict() -> None:
        raise ApiError(409, "avatar_busy", "avatar is training", {"avatar": "a1"}, {"X-A": "1"})

    @router.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @router.get("/mine")
    def mine(principal: PrincipalDep) -> dict[str, str]:
        return {"tenant": principal.tenant_id}

    return router


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    app = create_app(settings)
    app.include_router(probe_router())
    return app


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def api_key(sessions: sessionmaker[Session]) -> str:
    with session_scope(sessions) as session:
        plaintext, _ = create_api_key(session, create_tenant(session, "acme"), "ci")
    return plaintext


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    """Check the typed error body and return its `error` object."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


# --- auth ------------------------------------------------------------------------------------


def test_me_with_a_valid_key(client: TestClient, api_key: str) -> None:
    r = client.get("/v1/me", headers=bearer(api_key))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tenant"]["name"] == "acme"
    assert body["key"]["name"] == "ci"
    assert api_key.startswith(f"lpd_{body['key']['prefix']}_")


def test_only_the_secret_hash_is_stored(sessions: sessionmaker[Session], api_key: str) -> None:
    secret = api_key.split("_", 2)[2]
    with sessions() as session:
        principal = authenticate(session, f"bearer {api_key}")  # scheme is case-insensitive
        row = session.get(ApiKey, principal.key_id)
    assert row is not None
    assert secret not in (row.secret_sha256, row.prefix)
    assert len(row.secret_sha256) == 64


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "Basic dXNlcjpwYXNz",
        "Bearer not-a-key",
        "Bearer lpd_short_x",
        "Bearer lpd_0123456789ab_" + "x" * 200,
    ],
)
def test_malformed_authorization_is_401(client: TestClient, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    r = client.get("/v1/me", headers=headers)
    assert_error(r, 401, "unauthorized")
    assert r.headers["WWW-Authenticate"] == "Bearer"


def test_wrong_secret_is_401(client: TestClient, api_key: str) -> None:
    wrong = api_key[:-4] + ("AAAA" if not api_key.endswith("AAAA") else "BBBB")
    assert_error(client.get("/v1/me", headers=bearer(wrong)), 401, "unauthorized")
    unknown_prefix = "lpd_000000000000_" + api_key.split("_", 2)[2]
    assert_error(client.get("/v1/me", headers=bearer(unknown_prefix)), 401, "unauthorized")


def test_revoked_key_is_401(
    client: TestClient, api_key: str, sessions: sessionmaker[Session]
) -> None:
    assert client.get("/v1/me", headers=bearer(api_key)).status_code == 200
    with session_scope(sessions) as session:
        revoke_api_key(session, api_key.split("_")[1])
    err = assert_error(client.get("/v1/me", headers=bearer(api_key)), 401, "unauthorized")
    assert "revoked" in err["message"]
    with sessions() as session, pytest.raises(AuthenticationError):
        authenticate(session, f"Bearer {api_key}")


def test_key_and_tenant_validation(sessions: sessionmaker[Session]) -> None:
    with session_scope(sessions) as session:
        tenant = create_tenant(session, "acme")
        with pytest.raises(ValueError, match="already exists"):
            create_tenant(session, "acme")
        with pytest.raises(ValueError, match="must match"):
            create_tenant(session, "has space")
        with pytest.raises(ValueError, match="1-100"):
            create_api_key(session, tenant, "  ")
        with pytest.raises(ValueError, match="rate limit"):
            create_api_key(session, tenant, "ci", rate_limit_per_minute=0)
        with pytest.raises(LookupError):
            revoke_api_key(session, "ffffffffffff")


# --- error bodies ----------------------------------------------------------------------------


def test_unknown_route_is_typed_404(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_wrong_method_is_typed_405(client: TestClient) -> None:
    r = client.delete("/healthz")
    assert_error(r, 405, "method_not_allowed")
    assert r.headers["Allow"] == "GET"


def test_validation_error_is_typed_422(client: TestClient) -> None:
    r = client.post("/probe/items/abc", json={"name": "  ", "size": "big"})
    err = assert_error(r, 422, "invalid_request")
    locs = {tuple(d["loc"]) for d in err["details"]}
    assert locs == {("path", "item_id"), ("body", "name"), ("body", "size")}
    assert all(set(d) <= {"loc", "type", "msg", "ctx"} for d in err["details"])
    assert "big" not in r.text  # the rejected input is not echoed back


def test_malformed_json_is_422_not_500(client: TestClient) -> None:
    r = client.post(
        "/probe/items/1", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(r, 422, "invalid_request")


def test_api_error_renders_its_fields(client: TestClient) -> None:
    r = client.get("/probe/conflict")
    err = assert_error(r, 409, "avatar_busy")
    assert err == {
        "code": "avatar_busy",
        "message": "avatar is training",
        "details": {"avatar": "a1"},
    }
    assert r.headers["X-A"] == "1"


def test_unexpected_error_is_500_without_internals(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    r = client.get("/probe/boom")
    assert_error(r, 500, "internal_error")
    assert "passwd" not in r.text and "RuntimeError" not in r.text
    assert "passwd" in caplog.text  # but the server log has it


def test_unmigrated_database_is_503(tmp_path: Path, settings: Settings) -> None:
    empty = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'empty.db'}"})
    with TestClient(create_app(empty), raise_server_exceptions=False) as c:
        r = c.get("/v1/me", headers=bearer("lpd_0123456789ab_" + "x" * 43))
    assert_error(r, 503, "database_unavailable")
    assert r.headers["Retry-After"] == "7"


def test_settings_dependency_can_be_overridden(app: FastAPI, settings: Settings) -> None:
    other = settings.model_copy(update={"retry_after_s": 42})
    app.dependency_overrides[get_settings] = lambda: other
    with TestClient(app) as c:
        assert c.get("/readyz").headers["Retry-After"] == "42"


# --- health ----------------------------------------------------------------------------------


def test_healthz(client: TestClient) -> None:
    r = client.get("/healthz")
    assert (r.status_code, r.json()) == (200, {"status": "ok"})


def test_readyz_reports_redis_down(client: TestClient) -> None:
    start = time.monotonic()
    r = client.get("/readyz")
    assert time.monotonic() - start < 10
    err = assert_error(r, 503, "not_ready")
    assert r.headers["Retry-After"] == "7"
    checks = err["details"]["checks"]
    assert checks["database"] is True
    assert checks["redis"] is False
    assert checks["triton"] is False  # nothing listens there in unit tests
    assert checks["workers"] == health.WORKERS_NOT_CHECKED
    assert "redis" in err["details"]["down"]
    assert "workers" not in err["details"]["down"]
    assert "redis" in err["message"]


def test_readyz_ok_when_every_check_passes(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(health, "check_redis", lambda client: True)
    monkeypatch.setattr(health, "check_triton", lambda backend: True)
    r = client.get("/readyz")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "status": "ok",
        "checks": {"database": True, "redis": True, "triton": True, "workers": "not checked"},
    }


def test_readyz_times_out_a_hung_check(
    app: FastAPI, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    app.state.settings = settings.model_copy(update={"readiness_timeout_s": 0.2})
    monkeypatch.setattr(health, "check_redis", lambda client: time.sleep(1.0) or True)
    monkeypatch.setattr(health, "check_triton", lambda backend: True)
    with TestClient(app) as c:
        start = time.monotonic()
        r = c.get("/readyz")
        assert time.monotonic() - start < 0.9
    assert r.status_code == 503
    assert r.json()["error"]["details"]["down"] == ["redis"]


def test_metrics_count_requests_by_route_template(client: TestClient) -> None:
    client.get("/healthz")
    client.post("/probe/items/1", json={"name": "a", "size": 1})
    client.post("/probe/items/2", json={"name": "b", "size": 2})
    client.get("/no/such/path")
    r = client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert 'lpd_http_requests_total{method="GET",route="/healthz",status="200"} 1.0' in text
    assert (
        'lpd_http_requests_total{method="POST",route="/probe/items/{item_id}",status="200"} 2.0'
        in text
    )
    assert 'route="<unmatched>",status="404"' in text
    assert "/no/such/path" not in text
    assert "lpd_http_request_duration_seconds_bucket" in text


def test_openapi_documents_the_api(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["info"]["title"] == "Latent Pose Reenactment API"
    assert spec["info"]["version"]
    me = spec["paths"]["/v1/me"]["get"]
    assert me["security"] == [{"ApiKey": []}]
    assert me["responses"]["401"]["content"]["application/json"]["example"]["error"]["code"]
    assert spec["paths"]["/readyz"]["get"]["responses"]["503"]
    assert "ErrorResponse" in spec["components"]["schemas"]


# --- admin CLI -------------------------------------------------------------------------------


def cli(capsys: pytest.CaptureFixture[str], url: str, *args: str) -> tuple[int, str, str]:
    code = admin.main(["--database-url", url, *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_admin_cli_key_lifecycle(
    tmp_path: Path, settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    assert cli(capsys, url, "migrate")[0] == 0
    assert cli(capsys, url, "create-tenant", "acme")[0] == 0
    code, out, err = cli(capsys, url, "create-key", "--tenant", "acme", "--name", "ci")
    assert code == 0
    key = out.strip()
    assert key.startswith("lpd_")
    assert "not shown again" in err

    app = create_app(settings.model_copy(update={"database_url": url}))
    with TestClient(app) as c:
        r = c.get("/v1/me", headers=bearer(key))
        assert r.status_code == 200, r.text
        assert r.json()["tenant"]["name"] == "acme"

        prefix = key.split("_")[1]
        code, out, _ = cli(capsys, url, "list-keys", "--tenant", "acme")
        assert code == 0
        assert prefix in out and "ci" in out
        assert key.split("_", 2)[2] not in out

        assert cli(capsys, url, "revoke-key", prefix)[0] == 0
        assert c.get("/v1/me", headers=bearer(key)).status_code == 401
        assert cli(capsys, url, "revoke-key", prefix)[0] == 0  # idempotent


def test_admin_cli_prints_the_tenants_webhook_secret(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from service.config import get_settings
    from service.webhooks import sign, verify_signature

    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cli(capsys, url, "migrate")
    cli(capsys, url, "create-tenant", "acme")
    cli(capsys, url, "create-tenant", "other")
    get_settings.cache_clear()
    monkeypatch.delenv("LPD_SIGNED_URL_SECRET", raising=False)
    code, _, err = cli(capsys, url, "webhook-secret", "--tenant", "acme")
    assert code == 2 and "LPD_SIGNED_URL_SECRET" in err
    monkeypatch.setenv("LPD_SIGNED_URL_SECRET", "master")
    get_settings.cache_clear()
    try:
        code, acme, _ = cli(capsys, url, "webhook-secret", "--tenant", "acme")
        other = cli(capsys, url, "webhook-secret", "--tenant", "other")[1]
    finally:
        get_settings.cache_clear()
    assert code == 0 and acme.startswith("whsec_") and acme != other
    body = b'{"type": "job.succeeded"}'
    assert verify_signature(acme.strip(), sign(acme.strip(), body), body)  # as a receiver does


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create-key", "--tenant", "nobody", "--name", "ci"], "no tenant named 'nobody'"),
        (["create-tenant", "acme"], "already exists"),
        (["create-tenant", "bad name"], "must match"),
        (["revoke-key", "ffffffffffff"], "no API key"),
        (["list-keys", "--tenant", "nobody"], "no tenant"),
        (["create-key", "--tenant", "acme", "--name", "x", "--rate", "0"], "rate limit"),
    ],
)
def test_admin_cli_bad_input_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cli(capsys, url, "migrate")
    cli(capsys, url, "create-tenant", "acme")
    code, _, err = cli(capsys, url, *args)
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert err.count("\n") == 1  # one line


def test_admin_cli_unmigrated_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, f"sqlite:///{tmp_path / 'none.db'}", "create-tenant", "acme")
    assert code == 1
    assert "migrate" in err and err.count("\n") == 1


def test_admin_cli_runs_as_module(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    run = [sys.executable, "-m", "service.admin", "--database-url", url]
    assert subprocess.run([*run, "migrate"], capture_output=True, timeout=60).returncode == 0
    result = subprocess.run(
        [*run, "list-keys", "--tenant", "nobody"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    usage = subprocess.run([*run, "no-such-command"], capture_output=True, timeout=60)
    assert usage.returncode == 2
