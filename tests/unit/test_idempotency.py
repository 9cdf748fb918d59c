"""Idempotency-Key on POST /v1/avatars: replay, key reuse, in-flight and failed first
requests, expiry and purge; the fingerprint; `begin` racing itself. SQLite in tmp_path."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.auth import find_tenant
from service.config import Settings
from service.db import session_scope
from service.errors import ApiError
from service.idempotency import (
    Claim,
    Replay,
    abandon,
    begin,
    complete,
    purge_idempotency,
    request_fingerprint,
)
from service.models import Avatar, IdempotencyRecord, Job, utcnow
from tests.unit import test_avatars_api as avatars_api
from tests.unit.test_avatars_api import (
    RecordingQueue,
    count,
    face_jpeg,
    photos,
    post_avatar,
    stored_files,
    tiny_png,
)

# The avatar tests' fixtures (SQLite, artifacts in tmp_path, Redis on a closed port).
settings = avatars_api.settings
queue = avatars_api.queue
app = avatars_api.app
client = avatars_api.client
alice = avatars_api.alice
bob = avatars_api.bob


def keyed(headers: dict[str, str], key: str | bytes) -> dict[str, Any]:
    return {**headers, "Idempotency-Key": key}


def tenant_id(sessions: sessionmaker[Session], name: str) -> str:
    with session_scope(sessions) as session:
        tenant = find_tenant(session, name)
        assert tenant is not None
        return tenant.id


def records(sessions: sessionmaker[Session]) -> list[IdempotencyRecord]:
    with session_scope(sessions) as session:
        return list(session.scalars(select(IdempotencyRecord)))


def avatar_dirs(settings: Settings) -> list[Path]:
    """Every avatar folder, empty ones included (a replay must not leave one behind)."""
    return sorted(settings.artifacts_dir.glob("tenants/*/avatars/*"))


def default_fingerprint(tmp_path: Path) -> str:
    """The fingerprint of `post_avatar(client, headers)`: one tiny PNG, no fields."""
    photo = tmp_path / "photo.png"
    photo.write_bytes(tiny_png())
    return request_fingerprint("POST", "/v1/avatars", {}, {"photos": [photo]})


def age(sessions: sessionmaker[Session], seconds: float) -> None:
    """Move every record's creation `seconds` into the past."""
    with session_scope(sessions) as session:
        session.execute(
            update(IdempotencyRecord).values(created_at=utcnow() - timedelta(seconds=seconds))
        )


# --- replay ----------------------------------------------------------------------------------


def test_retry_replays_the_first_response(
    client: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    files = photos(face_jpeg()) + photos(tiny_png())
    first = post_avatar(client, keyed(alice, "k-1"), files=files, name="Ada", fine_tune="light")
    assert first.status_code == 202, first.text
    assert "Idempotent-Replayed" not in first.headers

    again = post_avatar(client, keyed(alice, "k-1"), files=files, name="Ada", fine_tune="light")
    assert again.status_code == 202, again.text
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"]
    # One avatar, one job, one task, one set of photos; the replay's upload is gone.
    assert count(sessions, Avatar) == count(sessions, Job) == 1
    assert queue.sent == [(queue.sent[0][0], first.json()["job"]["id"])]
    assert len(stored_files(settings)) == 2
    assert len(avatar_dirs(settings)) == 1
    [record] = records(sessions)
    assert (record.key, record.response_status) == ("k-1", 202)


def test_keys_are_per_tenant_and_requests_without_one_are_not_deduplicated(
    client: TestClient,
    alice: dict[str, str],
    bob: dict[str, str],
    sessions: sessionmaker[Session],
) -> None:
    a = post_avatar(client, keyed(alice, "same"))
    b = post_avatar(client, keyed(bob, "same"))
    assert (a.status_code, b.status_code) == (202, 202)
    assert "Idempotent-Replayed" not in b.headers
    assert a.json()["job"]["id"] != b.json()["job"]["id"]
    post_avatar(client, alice)
    post_avatar(client, alice)
    assert count(sessions, Job) == 4


def test_key_reused_with_another_request_is_422(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    assert post_avatar(client, keyed(alice, "k"), name="Ada").status_code == 202
    for other in [
        {"name": "Bea"},  # another field value
        {"name": "Ada", "files": photos(face_jpeg())},  # other photo bytes
        {"name": "Ada", "files": photos(tiny_png(), tiny_png())},  # another photo count
    ]:
        r = post_avatar(client, keyed(alice, "k"), **other)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "idempotency_key_reused"
    assert count(sessions, Avatar) == 1
    assert len(avatar_dirs(settings)) == 1 and len(stored_files(settings)) == 1


@pytest.mark.parametrize(
    "key",
    [
        pytest.param("x" * 256, id="too-long"),
        pytest.param("ключ".encode(), id="not-ascii"),
        pytest.param("", id="empty"),
    ],
)
def test_malformed_key_is_422(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    key: str | bytes,
) -> None:
    r = post_avatar(client, keyed(alice, key))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["code"] == "invalid_idempotency_key"
    assert count(sessions, Avatar) == 0 and stored_files(settings) == []


def test_longest_printable_key_is_accepted(client: TestClient, alice: dict[str, str]) -> None:
    key = ("Az09 -_.~!" * 26)[:255]
    assert post_avatar(client, keyed(alice, key)).status_code == 202
    assert post_avatar(client, keyed(alice, key)).headers["Idempotent-Replayed"] == "true"


# --- in flight, failures, expiry -------------------------------------------------------------


def test_first_request_in_flight_is_409_until_it_goes_stale(
    client: TestClient,
    app: FastAPI,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
    tmp_path: Path,
) -> None:
    claim = begin(
        sessions, tenant_id(sessions, "alice"), "k", default_fingerprint(tmp_path), settings
    )
    assert isinstance(claim, Claim)
    r = post_avatar(client, keyed(alice, "k"))
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "idempotency_in_progress"
    assert r.headers["Retry-After"] == str(settings.retry_after_s)
    assert count(sessions, Avatar) == 0 and avatar_dirs(settings) == []
    # A different request under the key is still a misuse, in flight or not.
    assert post_avatar(client, keyed(alice, "k"), name="Bea").status_code == 422

    # The first request's process died: past `idempotency_stale_s` a retry takes the key.
    app.state.settings = settings.model_copy(update={"idempotency_stale_s": 60})
    age(sessions, 61)
    r = post_avatar(client, keyed(alice, "k"))
    assert r.status_code == 202, r.text
    [record] = records(sessions)
    assert record.id != claim.record_id and record.response_status == 202
    # The dead request can no longer touch the key.
    complete(sessions, claim, 500, {"stale": True})
    abandon(sessions, claim)
    assert records(sessions)[0].response_body == r.json()


def test_failed_first_request_can_be_retried(
    client: TestClient,
    alice: dict[str, str],
    queue: RecordingQueue,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    queue.down = True
    r = post_avatar(client, keyed(alice, "k"))
    assert r.status_code == 503, r.text
    assert records(sessions) == [] and avatar_dirs(settings) == []

    queue.down = False
    r = post_avatar(client, keyed(alice, "k"))
    assert r.status_code == 202, r.text
    assert "Idempotent-Replayed" not in r.headers
    assert count(sessions, Avatar) == 1 and queue.sent[0][1] == r.json()["job"]["id"]
    assert records(sessions)[0].response_status == 202


def test_rejected_photo_releases_the_key(
    client: TestClient, alice: dict[str, str], sessions: sessionmaker[Session]
) -> None:
    """Photos are decoded after the key is claimed: a bad one must not hold the key."""
    r = post_avatar(client, keyed(alice, "k"), files=photos(b"not an image"))
    assert r.status_code == 422 and r.json()["error"]["code"] == "not_an_image"
    assert records(sessions) == []
    assert post_avatar(client, keyed(alice, "k")).status_code == 202


def test_quota_with_a_key(
    app: FastAPI,
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    app.state.settings = settings.model_copy(update={"max_avatars_per_tenant": 1})
    done = post_avatar(client, keyed(alice, "first"))
    assert done.status_code == 202
    # The retry of a request that succeeded replays, though the quota is now used up ...
    again = post_avatar(client, keyed(alice, "first"))
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (202, "true")
    # ... while a new request is refused, stores nothing and leaves its key free.
    r = post_avatar(client, keyed(alice, "second"))
    assert r.status_code == 429 and r.json()["error"]["code"] == "quota_exceeded"
    assert [rec.key for rec in records(sessions)] == ["first"]
    assert len(avatar_dirs(settings)) == 1
    client.delete(f"/v1/avatars/{done.json()['avatar']['id']}", headers=alice)
    assert post_avatar(client, keyed(alice, "second")).status_code == 202


def test_expired_record_counts_as_absent_and_is_purged(
    app: FastAPI,
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    app.state.settings = settings.model_copy(update={"idempotency_ttl_s": 3600})
    first = post_avatar(client, keyed(alice, "k")).json()
    age(sessions, 3601)
    second = post_avatar(client, keyed(alice, "k"))
    assert second.status_code == 202 and "Idempotent-Replayed" not in second.headers
    assert second.json()["job"]["id"] != first["job"]["id"]
    assert count(sessions, Avatar) == 2

    post_avatar(client, keyed(alice, "fresh"))
    age_one = utcnow() - timedelta(seconds=1800)
    with session_scope(sessions) as session:
        session.execute(
            update(IdempotencyRecord)
            .where(IdempotencyRecord.key == "k")
            .values(created_at=utcnow() - timedelta(hours=25))
        )
    with session_scope(sessions) as session:
        assert purge_idempotency(session, age_one) == 1
    assert [r.key for r in records(sessions)] == ["fresh"]


# --- the building blocks ---------------------------------------------------------------------


def test_fingerprint_covers_the_request(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    fields = {"x": "1", "y": "2"}

    def fingerprint(**change: Any) -> str:
        request = {"method": "POST", "path": "/v1/avatars", "fields": fields}
        request |= {"files": {"photos": [a, b]}} | change
        return request_fingerprint(**request)

    base = fingerprint()
    assert base == fingerprint(method="post", fields={"y": "2", "x": "1"})
    assert base == fingerprint(files={"photos": [a, b], "video": []})
    for change in [
        {"method": "PUT"},
        {"path": "/v1/jobs"},
        {"fields": {"x": "1", "y": "3"}},
        {"fields": {"x": "1"}},
        {"files": {"photos": [b, a]}},
        {"files": {"video": [a, b]}},
    ]:
        assert fingerprint(**change) != base, change
    a.write_bytes(b"One")
    assert fingerprint() != base


def test_concurrent_first_requests_get_one_claim(
    client: TestClient,
    alice: dict[str, str],
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    tenant = tenant_id(sessions, "alice")
    outcomes: list[object] = []
    barrier = threading.Barrier(6)

    def race() -> None:
        barrier.wait()
        try:
            outcomes.append(begin(sessions, tenant, "k", "f" * 64, settings))
        except ApiError as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=race) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    claims = [o for o in outcomes if isinstance(o, Claim)]
    assert len(claims) == 1
    assert sorted(o for o in outcomes if isinstance(o, str)) == ["idempotency_in_progress"] * 5
    complete(sessions, claims[0], 201, {"ok": 1})
    assert begin(sessions, tenant, "k", "f" * 64, settings) == Replay(201, {"ok": 1})


def test_openapi_documents_limits_and_the_key(client: TestClient) -> None:
    post = client.get("/openapi.json").json()["paths"]["/v1/avatars"]["post"]
    assert {"409", "422", "429"} <= set(post["responses"])
    too_many = post["responses"]["429"]
    examples = too_many["content"]["application/json"]["examples"]
    assert set(examples) == {"rate_limited", "quota_exceeded"}
    assert {"Retry-After", "X-RateLimit-Remaining"} <= set(too_many["headers"])
    assert "Idempotency-Key" in {p["name"] for p in post["parameters"] if p["in"] == "header"}
