"""Webhooks: signatures, callback URL checks, the outbox row written with a job's final
transition, and delivery attempts against a real local HTTP server (SQLite in tmp_path)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.config import Settings
from service.db import session_scope
from service.jobs import transition
from service.models import Job, JobKind, JobStatus, Tenant, WebhookDelivery, utcnow
from service.queue import WEBHOOK_TASK
from service.storage import ArtifactStore
from service.webhooks import (
    DELIVERY_HEADER,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    InvalidCallbackUrl,
    dispatch_pending,
    sign,
    validate_callback_url,
    verify_signature,
    webhook_secret,
)
from workers import webhooks
from workers.runtime import WorkerContext

SECRET = "test-secret"


# --- a receiver ------------------------------------------------------------------------------


@dataclass
class Received:
    path: str
    headers: Message  # case-insensitive, as HTTP header names are
    body: bytes


@dataclass
class Receiver:
    """A local HTTP server: `/ok` answers 204, `/fail` 500, `/redirect` 302 to `/ok`."""

    url: str
    requests: list[Received] = field(default_factory=list)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            state.requests.append(Received(self.path, self.headers, body))
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", f"{state.url}/ok")
            else:
                self.send_response(204 if self.path == "/ok" else 500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()


class RecordingQueue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []
        self.down = False

    def enqueue(self, task: str, job_id: str) -> None:
        if self.down:
            raise ConnectionError("broker down")
        self.sent.append((task, job_id))

    def workers_per_queue(self, timeout_s: float) -> dict[str, int]:
        return {}


def make_settings(db_url: str, tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "artifacts_dir": tmp_path / "artifacts",
        "signed_url_secret": SECRET,
        "webhook_allow_private_hosts": True,
        "webhook_backoff_s": 0.05,
        "webhook_max_attempts": 3,
        "webhook_timeout_s": 5.0,
    }
    return Settings(**{**values, **overrides})


def make_ctx(sessions: sessionmaker[Session], settings: Settings) -> WorkerContext:
    return WorkerContext(
        settings, sessions, ArtifactStore(settings.artifacts_dir), RecordingQueue()
    )


def make_job(sessions: sessionmaker[Session], callback_url: str | None) -> tuple[str, str]:
    with session_scope(sessions) as session:
        tenant = Tenant(name=f"t{time.monotonic_ns()}")
        session.add(tenant)
        session.flush()
        job = Job(tenant_id=tenant.id, kind=JobKind.REENACT, params={}, callback_url=callback_url)
        session.add(job)
        session.flush()
        return tenant.id, job.id


def deliveries(sessions: sessionmaker[Session], job_id: str | None = None) -> list[WebhookDelivery]:
    with sessions() as session:
        stmt = select(WebhookDelivery).order_by(WebhookDelivery.created_at)
        if job_id is not None:
            stmt = stmt.where(WebhookDelivery.job_id == job_id)
        return list(session.scalars(stmt))


def finished_job(sessions: sessionmaker[Session], url: str) -> tuple[str, str, str]:
    """A canceled job with a callback URL: (tenant id, job id, delivery id)."""
    tenant_id, job_id = make_job(sessions, url)
    with session_scope(sessions) as session:
        assert transition(session, job_id, JobStatus.CANCELED, stage="canceled")
    (row,) = deliveries(sessions, job_id)
    return tenant_id, job_id, row.id


# --- signatures ------------------------------------------------------------------------------


def test_signature_round_trip() -> None:
    body = b'{"id":"x","type":"job.succeeded"}'
    header = sign(SECRET, body, timestamp=1_800_000_000)
    assert header.startswith("t=1800000000,v1=")
    assert verify_signature(SECRET, header, body, now=1_800_000_100)
    assert verify_signature(SECRET.encode(), header, body.decode(), now=1_800_000_000)


def test_signature_rejects_tampering_and_stale_timestamps() -> None:
    body = b'{"id":"x"}'
    now = time.time()
    header = sign(SECRET, body)
    assert verify_signature(SECRET, header, body)
    assert not verify_signature(SECRET, header, body + b" ")  # tampered body
    assert not verify_signature("other", header, body)  # wrong key
    t, v1 = header.split(",")
    assert not verify_signature(SECRET, f"t={int(t[2:]) + 1},{v1}", body)  # tampered time
    old = sign(SECRET, body, timestamp=int(now) - 301)
    assert not verify_signature(SECRET, old, body)  # expired
    assert verify_signature(SECRET, old, body, tolerance_s=600)
    future = sign(SECRET, body, timestamp=int(now) + 301)
    assert not verify_signature(SECRET, future, body)
    for bad in (None, "", "v1=abc", "t=1", "t=x,v1=abc", "garbage"):
        assert not verify_signature(SECRET, bad, body)
    # Key rotation: any v1 may match.
    rotated = f"{header},v1={sign('new', body).split('v1=')[1]}"
    assert verify_signature("new", rotated, body) and verify_signature(SECRET, rotated, body)


def test_tenant_secrets_are_derived_and_distinct(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path)
    a, b = webhook_secret(settings, "a"), webhook_secret(settings, "b")
    assert a.startswith("whsec_") and a != b and SECRET not in a
    assert a == webhook_secret(settings, "a")
    assert webhook_secret(make_settings("sqlite://", tmp_path, signed_url_secret=""), "a") == ""


# --- callback URLs ---------------------------------------------------------------------------

PUBLIC = "93.184.216.34"  # an IP literal: no DNS needed


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        (f"https://{PUBLIC}/hooks/lpd?x=1", True),
        (f"http://{PUBLIC}:8080/", True),
        ("http://127.0.0.1:8000/hook", False),  # loopback
        ("http://localhost/hook", False),
        ("http://[::1]/hook", False),
        ("http://[::ffff:127.0.0.1]/hook", False),  # IPv4-mapped loopback
        ("http://10.1.2.3/hook", False),  # private
        ("http://192.168.0.10/hook", False),
        ("http://169.254.169.254/latest/meta-data", False),  # link-local (cloud metadata)
        ("http://0.0.0.0/hook", False),
        (f"http://user:pw@{PUBLIC}/hook", False),  # credentials
        (f"http://user@{PUBLIC}/hook", False),
        (f"ftp://{PUBLIC}/hook", False),
        ("javascript:alert(1)", False),
        ("http:///nohost", False),
        (f"http://{PUBLIC}:99999/", False),  # bad port
        (f"http://{PUBLIC}/a b", False),  # whitespace
        (f"http://{PUBLIC}/" + "a" * 2048, False),  # too long
        ("", False),
    ],
)
def test_callback_url_rules(url: str, ok: bool, tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path, webhook_allow_private_hosts=False)
    if ok:
        target = validate_callback_url(url, settings)
        assert url.startswith(f"{target.scheme}://") and target.path.startswith("/")
    else:
        with pytest.raises(InvalidCallbackUrl) as info:
            validate_callback_url(url, settings)
        assert not info.value.retryable


def test_private_hosts_allowed_when_configured(tmp_path: Path) -> None:
    settings = make_settings("sqlite://", tmp_path, webhook_allow_private_hosts=True)
    assert validate_callback_url("http://127.0.0.1:9/hook", settings)
    with pytest.raises(InvalidCallbackUrl):  # the other rules still hold
        validate_callback_url("http://u:p@127.0.0.1/hook", settings)


def test_a_name_is_checked_by_every_address_it_resolves_to(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings("sqlite://", tmp_path, webhook_allow_private_hosts=False)

    def resolve(host: str, port: int, **kwargs: Any) -> list[Any]:
        addresses = {"mixed.example": [PUBLIC, "10.0.0.7"], "public.example": [PUBLIC]}
        if host not in addresses:
            raise socket.gaierror("no such host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses[host]]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert validate_callback_url("https://public.example/h", settings)
    with pytest.raises(InvalidCallbackUrl, match="not a public address"):
        validate_callback_url("https://mixed.example/h", settings)
    with pytest.raises(InvalidCallbackUrl, match="does not resolve") as info:
        validate_callback_url("https://gone.example/h", settings)
    assert info.value.retryable


def test_post_connects_to_the_vetted_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name is resolved once, at the check; the POST goes to that address (a later DNS
    answer cannot redirect it). `hooks.example` resolves only through the patched lookup."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from workers.webhooks import post

    seen: list[tuple[str | None, bytes]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(
                (self.headers["Host"], self.rfile.read(int(self.headers["Content-Length"])))
            )
            self.send_response(204)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    real = socket.getaddrinfo
    monkeypatch.setattr(
        socket,
        "getaddrinfo",
        lambda host, *a, **kw: (
            real("127.0.0.1", *a, **kw) if host == "hooks.example" else real(host, *a, **kw)
        ),
    )
    settings = make_settings("sqlite://", tmp_path, webhook_allow_private_hosts=True)
    target = validate_callback_url(f"http://hooks.example:{port}/in?x=1", settings)
    assert (target.address, target.path) == ("127.0.0.1", "/in?x=1")
    monkeypatch.setattr(socket, "getaddrinfo", real)  # "rebinding": the name is gone now
    try:
        assert post(target, b"{}", {"Content-Type": "application/json"}, 5.0) == 204
    finally:
        server.shutdown()
    assert seen == [(f"hooks.example:{port}", b"{}")]


# --- the outbox ------------------------------------------------------------------------------


@pytest.mark.parametrize("final", [JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED])
def test_a_final_transition_records_a_delivery(
    sessions: sessionmaker[Session], final: JobStatus
) -> None:
    _, job_id = make_job(sessions, "https://example.com/hook")
    with session_scope(sessions) as session:
        assert transition(session, job_id, JobStatus.RUNNING)
        assert deliveries(sessions, job_id) == []  # not final: nothing yet
        assert transition(session, job_id, final)
    (row,) = deliveries(sessions, job_id)
    assert (row.event, row.url, row.attempts) == (
        f"job.{final.value}",
        "https://example.com/hook",
        0,
    )
    assert row.delivered_at is None and row.next_attempt_at is not None
    assert row.next_attempt_at <= utcnow()
    with session_scope(sessions) as session:  # a transition that does not apply adds nothing
        assert not transition(session, job_id, JobStatus.CANCELED)
    assert len(deliveries(sessions, job_id)) == 1


def test_no_delivery_without_a_callback_url(sessions: sessionmaker[Session]) -> None:
    _, job_id = make_job(sessions, None)
    with session_scope(sessions) as session:
        assert transition(session, job_id, JobStatus.CANCELED)
    assert deliveries(sessions) == []


def test_a_rolled_back_transition_leaves_no_delivery(sessions: sessionmaker[Session]) -> None:
    _, job_id = make_job(sessions, "https://example.com/hook")

    def fail_after_the_transition() -> None:
        with session_scope(sessions) as session:
            assert transition(session, job_id, JobStatus.CANCELED)
            raise RuntimeError("the rest of the unit of work failed")

    with pytest.raises(RuntimeError):
        fail_after_the_transition()
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.status is JobStatus.QUEUED
    assert deliveries(sessions) == []


def test_dispatch_publishes_due_rows(sessions: sessionmaker[Session]) -> None:
    _, job_a, a = finished_job(sessions, "https://example.com/a")
    _, _, b = finished_job(sessions, "https://example.com/b")
    queue = RecordingQueue()
    with sessions() as session:
        assert dispatch_pending(session, queue, job_id=job_a) == [a]
        assert dispatch_pending(session, queue) == [a, b]
    assert queue.sent == [(WEBHOOK_TASK, a), (WEBHOOK_TASK, a), (WEBHOOK_TASK, b)]
    queue.down = True
    with sessions() as session:  # best effort: the sweep will try again
        assert dispatch_pending(session, queue) == []


# --- delivery --------------------------------------------------------------------------------


def test_a_2xx_delivers_once_with_a_valid_signature(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(db_url, tmp_path)
    ctx = make_ctx(sessions, settings)
    tenant_id, job_id, delivery_id = finished_job(sessions, f"{receiver.url}/ok")

    attempt = webhooks.deliver(ctx, delivery_id)
    assert (attempt.outcome, attempt.status_code, attempt.attempts) == ("delivered", 204, 1)
    (request,) = receiver.requests
    assert request.headers[EVENT_HEADER] == "job.canceled"
    assert request.headers[DELIVERY_HEADER] == delivery_id
    assert request.headers["Content-Type"] == "application/json"
    secret = webhook_secret(settings, tenant_id)
    assert verify_signature(secret, request.headers[SIGNATURE_HEADER], request.body)
    assert not verify_signature(SECRET, request.headers[SIGNATURE_HEADER], request.body)
    event = json.loads(request.body)
    assert (event["id"], event["type"]) == (delivery_id, "job.canceled")
    assert event["data"]["job"]["id"] == job_id
    assert event["data"]["job"]["status"] == "canceled"
    assert "callback_url" not in event["data"]["job"]

    (row,) = deliveries(sessions, job_id)
    assert row.delivered_at is not None and row.next_attempt_at is None
    assert (row.status_code, row.attempts, row.last_error) == (204, 1, None)
    # Idempotent: a duplicate task (or the sweep) never sends a delivered row again.
    assert webhooks.deliver(ctx, delivery_id).outcome == "skipped"
    assert webhooks.sweep(ctx) == []
    assert len(receiver.requests) == 1


def test_failures_back_off_then_give_up(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    settings = make_settings(db_url, tmp_path)  # backoff 0.05 s, 3 attempts
    ctx = make_ctx(sessions, settings)
    _, job_id, delivery_id = finished_job(sessions, f"{receiver.url}/fail")

    before = utcnow()
    first = webhooks.deliver(ctx, delivery_id)
    assert (first.outcome, first.status_code, first.retry_in) == ("retry", 500, 0.05)
    (row,) = deliveries(sessions, job_id)
    assert row.attempts == 1 and row.status_code == 500 and row.delivered_at is None
    assert row.last_error is not None and "500" in row.last_error
    assert row.next_attempt_at is not None
    assert before + timedelta(seconds=0.05) <= row.next_attempt_at
    assert row.next_attempt_at <= utcnow() + timedelta(seconds=0.05)

    # Not due yet (the 1 s slack aside): push it out and a duplicate message is a no-op.
    with session_scope(sessions) as session:
        later = utcnow() + timedelta(minutes=1)
        session.execute(update(WebhookDelivery).values(next_attempt_at=later))
    assert webhooks.deliver(ctx, delivery_id).outcome == "skipped"
    assert len(receiver.requests) == 1
    with session_scope(sessions) as session:
        session.execute(update(WebhookDelivery).values(next_attempt_at=utcnow()))

    second = webhooks.deliver(ctx, delivery_id)
    assert (second.outcome, second.retry_in, second.attempts) == ("retry", 0.1, 2)
    third = webhooks.deliver(ctx, delivery_id)
    assert (third.outcome, third.retry_in, third.attempts) == ("gave_up", None, 3)
    (row,) = deliveries(sessions, job_id)
    assert (row.attempts, row.status_code, row.next_attempt_at, row.delivered_at) == (
        3,
        500,
        None,
        None,
    )
    assert webhooks.deliver(ctx, delivery_id).outcome == "skipped"
    assert webhooks.sweep(ctx) == []
    assert [r.path for r in receiver.requests] == ["/fail"] * 3


def test_redirects_are_not_followed(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    ctx = make_ctx(sessions, make_settings(db_url, tmp_path))
    _, _, delivery_id = finished_job(sessions, f"{receiver.url}/redirect")
    attempt = webhooks.deliver(ctx, delivery_id)
    assert (attempt.outcome, attempt.status_code) == ("retry", 302)
    assert [r.path for r in receiver.requests] == ["/redirect"]  # never /ok


def test_an_unreachable_receiver_is_retried(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = make_ctx(sessions, make_settings(db_url, tmp_path))
    _, job_id, delivery_id = finished_job(sessions, f"http://127.0.0.1:{port}/hook")
    attempt = webhooks.deliver(ctx, delivery_id)
    assert (attempt.outcome, attempt.status_code) == ("retry", None)
    (row,) = deliveries(sessions, job_id)
    assert row.last_error and row.status_code is None


def test_without_a_secret_nothing_is_sent(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    ctx = make_ctx(sessions, make_settings(db_url, tmp_path, signed_url_secret=""))
    _, job_id, delivery_id = finished_job(sessions, f"{receiver.url}/ok")
    assert webhooks.deliver(ctx, delivery_id).outcome == "gave_up"
    (row,) = deliveries(sessions, job_id)
    assert row.last_error == webhooks.NO_SECRET and row.next_attempt_at is None
    assert receiver.requests == []


def test_a_private_url_is_refused_at_send_time(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path, receiver: Receiver
) -> None:
    """A URL stored before the rules (or settings) changed is checked again on each send."""
    settings = make_settings(db_url, tmp_path, webhook_allow_private_hosts=False)
    ctx = make_ctx(sessions, settings)
    _, job_id, delivery_id = finished_job(sessions, f"{receiver.url}/ok")
    assert webhooks.deliver(ctx, delivery_id).outcome == "gave_up"
    (row,) = deliveries(sessions, job_id)
    assert row.last_error is not None and row.last_error.startswith("callback URL refused")
    assert receiver.requests == []


def test_the_sweep_publishes_due_deliveries(
    sessions: sessionmaker[Session], db_url: str, tmp_path: Path
) -> None:
    ctx = make_ctx(sessions, make_settings(db_url, tmp_path))
    _, job_id, delivery_id = finished_job(sessions, "https://example.com/hook")
    assert webhooks.sweep(ctx) == [delivery_id]
    assert webhooks.dispatch_job_events(ctx, job_id) == [delivery_id]
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(WebhookDelivery)) == 1
