"""Rate limits per API key (GCRA on the real Redis at 127.0.0.1:6379/9, skipped without one),
failing open when Redis is down, and per-tenant quotas on avatars and active jobs."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.auth import create_api_key, find_tenant
from service.config import Settings
from service.db import session_scope
from service.errors import ApiError
from service.jobs import transition
from service.main import create_app
from service.models import Avatar, Job, JobKind, JobStatus
from service.quotas import check_job_quota
from service.ratelimit import RateLimiter
from tests.unit import test_avatars_api as avatars_api
from tests.unit.test_avatars_api import RecordingQueue, count, post_avatar, stored_files

# The avatar tests' fixtures (SQLite, artifacts in tmp_path, Redis on a closed port).
settings = avatars_api.settings
queue = avatars_api.queue
app = avatars_api.app
client = avatars_api.client
alice = avatars_api.alice
bob = avatars_api.bob

REDIS_URL = "redis://127.0.0.1:6379/9"  # a DB of the tests' own; only our prefix is deleted
RATE_HEADERS = ("X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reset")


@pytest.fixture
def real_redis() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        conn.ping()
    except redis.exceptions.ConnectionError:
        conn.close()
        pytest.skip("no Redis on 127.0.0.1:6379")
    yield conn
    conn.close()


@pytest.fixture
def prefix(real_redis: redis.Redis) -> Iterator[str]:
    """A key prefix unique to the test; its keys are deleted afterwards."""
    prefix = f"test:ratelimit:{uuid.uuid4().hex}:"
    yield prefix
    keys = list(real_redis.scan_iter(match=f"{prefix}*"))
    if keys:
        real_redis.delete(*keys)


@pytest.fixture
def limited(settings: Settings, queue: RecordingQueue, prefix: str) -> Iterator[TestClient]:
    """The API on the real Redis, 3 requests per minute per key by default."""
    update = {"redis_url": REDIS_URL, "rate_limit_key_prefix": prefix, "rate_limit_per_minute": 3}
    app = create_app(settings.model_copy(update=update))
    app.state.queue = queue
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def rate_headers(response: Any) -> dict[str, int]:
    return {name: int(response.headers[name]) for name in RATE_HEADERS if name in response.headers}


# --- the limiter -----------------------------------------------------------------------------


def test_429_after_the_limit_with_headers(
    limited: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
) -> None:
    for remaining in (2, 1, 0):
        r = limited.get("/v1/avatars", headers=alice)
        assert r.status_code == 200, r.text
        got = rate_headers(r)
        assert (got["X-RateLimit-Limit"], got["X-RateLimit-Remaining"]) == (3, remaining)
        assert 0 < got["X-RateLimit-Reset"] <= 60
        assert "Retry-After" not in r.headers

    r = limited.get("/v1/avatars", headers=alice)
    assert r.status_code == 429
    error = r.json()["error"]
    assert error["code"] == "rate_limited"
    # One request every 20 s refills the budget of 3 per minute.
    assert 15 <= int(r.headers["Retry-After"]) <= 20
    assert error["details"] == {"limit": 3, "retry_after_s": int(r.headers["Retry-After"])}
    assert rate_headers(r)["X-RateLimit-Remaining"] == 0
    assert rate_headers(r)["X-RateLimit-Limit"] == 3

    # A limited upload is refused before anything is stored or queued.
    r = post_avatar(limited, alice)
    assert r.status_code == 429
    assert count(sessions, Avatar) == 0 and queue.sent == []
    # Unauthenticated requests are not counted (there is no key to count them against).
    r = limited.get("/v1/avatars")
    assert r.status_code == 401 and rate_headers(r) == {}


def test_headers_on_every_kind_of_response(limited: TestClient, alice: dict[str, str]) -> None:
    created = post_avatar(limited, alice)
    assert created.status_code == 202
    assert rate_headers(created)["X-RateLimit-Remaining"] == 2
    r = limited.delete(f"/v1/avatars/{created.json()['avatar']['id']}", headers=alice)
    assert r.status_code == 204  # a Response the route builds itself
    assert rate_headers(r)["X-RateLimit-Remaining"] == 1
    r = limited.get(f"/v1/avatars/{uuid.uuid4()}", headers=alice)
    assert r.status_code == 404  # errors count too
    assert rate_headers(r)["X-RateLimit-Remaining"] == 0


def test_keys_have_their_own_budgets_and_overrides(
    limited: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    sessions: sessionmaker[Session],
) -> None:
    with session_scope(sessions) as session:
        tenant = find_tenant(session, "alice")
        assert tenant is not None
        strict, _ = create_api_key(session, tenant, "strict", rate_limit_per_minute=1)
        generous, _ = create_api_key(session, tenant, "generous", rate_limit_per_minute=100)
    strict_key = {"Authorization": f"Bearer {strict}"}
    generous_key = {"Authorization": f"Bearer {generous}"}

    r = limited.get("/v1/avatars", headers=strict_key)
    assert r.status_code == 200
    assert rate_headers(r)["X-RateLimit-Limit"] == 1
    assert rate_headers(r)["X-RateLimit-Remaining"] == 0
    r = limited.get("/v1/avatars", headers=strict_key)
    assert r.status_code == 429
    assert 55 <= int(r.headers["Retry-After"]) <= 60

    # Above the default of 3: the override, not the default, applies.
    for _ in range(5):
        assert limited.get("/v1/avatars", headers=generous_key).status_code == 200
    # Another key of the same tenant, and another tenant's key, are untouched.
    assert rate_headers(limited.get("/v1/avatars", headers=alice))["X-RateLimit-Remaining"] == 2
    assert rate_headers(limited.get("/v1/avatars", headers=bob))["X-RateLimit-Remaining"] == 2


def test_gcra_refills_and_expires(real_redis: redis.Redis, prefix: str) -> None:
    limiter = RateLimiter(real_redis, period_s=1.0)  # limit 2: one slot back every 0.5 s
    key = f"{prefix}k"
    first, second, third = (limiter.hit(key, 2) for _ in range(3))
    assert (first.allowed, first.remaining) == (True, 1)
    assert (second.allowed, second.remaining) == (True, 0)
    assert not third.allowed and third.retry_after_s == 1 and third.remaining == 0
    assert 0 < real_redis.pttl(key) <= 1000  # the state disappears once the budget is full
    time.sleep(0.6)
    assert limiter.hit(key, 2).allowed
    time.sleep(1.1)
    assert real_redis.exists(key) == 0
    assert limiter.hit(key, 2).remaining == 1  # a full budget again


def test_redis_down_fails_open(
    client: TestClient, alice: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """`settings` points Redis at port 1: requests go through, unlimited and unlabelled."""
    with caplog.at_level(logging.WARNING, logger="service.ratelimit"):
        for _ in range(5):
            r = client.get("/v1/avatars", headers=alice)
            assert r.status_code == 200, r.text
            assert rate_headers(r) == {}
        assert post_avatar(client, alice).status_code == 202
    # Logged once per outage, not per request (the limiter leaves Redis alone for a while).
    warnings = [rec for rec in caplog.records if rec.name == "service.ratelimit"]
    assert len(warnings) == 1 and "Redis unavailable" in warnings[0].getMessage()


def test_redis_down_fails_closed_when_configured(
    app: FastAPI, settings: Settings, alice: dict[str, str]
) -> None:
    app.state.settings = settings.model_copy(update={"rate_limit_fail_open": False})
    with TestClient(app) as c:
        for _ in range(2):  # the first tries Redis, the second is refused without trying
            r = c.get("/v1/avatars", headers=alice)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "rate_limiter_unavailable"
            assert r.headers["Retry-After"] == str(settings.retry_after_s)


# --- quotas ----------------------------------------------------------------------------------


def test_avatar_quota(
    app: FastAPI,
    client: TestClient,
    settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
) -> None:
    app.state.settings = settings.model_copy(update={"max_avatars_per_tenant": 2})
    made = [post_avatar(client, alice).json()["avatar"]["id"] for _ in range(2)]
    r = post_avatar(client, alice)
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert error["details"] == {"quota": "avatars", "limit": 2, "used": 2}
    assert "Retry-After" not in r.headers  # waiting won't help; deleting will
    assert count(sessions, Avatar) == 2 and len(queue.sent) == 2
    assert len(stored_files(settings)) == 2
    # Per tenant: Bob is not affected; deleting one of Alice's frees a slot.
    assert post_avatar(client, bob).status_code == 202
    assert client.delete(f"/v1/avatars/{made[0]}", headers=alice).status_code == 204
    assert post_avatar(client, alice).status_code == 202


def test_active_job_quota(
    app: FastAPI,
    client: TestClient,
    settings: Settings,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
) -> None:
    app.state.settings = settings.model_copy(
        update={"max_active_jobs_per_tenant": 2, "quota_retry_after_s": 17}
    )
    first, second = (post_avatar(client, alice).json()["job"]["id"] for _ in range(2))
    with session_scope(sessions) as session:
        transition(session, second, JobStatus.RUNNING)  # running counts as active too
    r = post_avatar(client, alice)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["details"] == {"quota": "active_jobs", "limit": 2, "used": 2}
    assert r.headers["Retry-After"] == "17"
    assert count(sessions, Job) == 2
    # A finished (or canceled) job no longer counts.
    with session_scope(sessions) as session:
        transition(session, first, JobStatus.RUNNING)
        transition(session, first, JobStatus.SUCCEEDED)
    assert post_avatar(client, alice).status_code == 202


def test_check_job_quota_for_other_routes(
    client: TestClient,
    settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    sessions: sessionmaker[Session],
) -> None:
    """The function the reenactment route calls in its inserting transaction."""
    one = settings.model_copy(update={"max_active_jobs_per_tenant": 1})
    post_avatar(client, bob)  # Bob's active job is not Alice's
    with session_scope(sessions) as session:
        tenant = find_tenant(session, "alice")
        assert tenant is not None
        check_job_quota(session, tenant.id, one)
        session.add(Job(tenant_id=tenant.id, kind=JobKind.REENACT))
        session.flush()
        with pytest.raises(ApiError) as raised:
            check_job_quota(session, tenant.id, one)
    err = raised.value
    assert (err.status, err.code) == (429, "quota_exceeded")
    assert err.details == {"quota": "active_jobs", "limit": 1, "used": 1}
    assert err.headers["Retry-After"] == str(one.quota_retry_after_s)
