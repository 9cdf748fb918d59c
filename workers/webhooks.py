"""Webhooks, worker side: one delivery attempt (claim the row, POST the signed event, record
the outcome and the next retry) and the sweep that publishes due rows.

A row is claimed with a compare-and-set on `next_attempt_at` before the POST, so a row
published twice (a countdown retry and the sweep) is sent once per attempt; a worker that
dies mid-POST leaves the row due again after the claim's lease, and the sweep resends it.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final, Literal, cast

from sqlalchemy import CursorResult, update

from service.db import session_scope
from service.models import Job, WebhookDelivery, utcnow
from service.webhooks import (
    DELIVERY_HEADER,
    DUE_SLACK,
    EVENT_HEADER,
    SIGNATURE_HEADER,
    InvalidCallbackUrl,
    Target,
    dispatch_pending,
    event_body,
    sign,
    validate_callback_url,
    webhook_secret,
)
from workers.runtime import WorkerContext

logger = logging.getLogger(__name__)

NO_SECRET: Final = "no signing secret configured"
USER_AGENT: Final = "lpd-webhooks/1"
CLAIM_MARGIN_S: Final = 30.0  # beyond the POST timeout, before a claimed row is due again
MAX_ERROR_CHARS: Final = 500

Outcome = Literal["delivered", "retry", "gave_up", "skipped"]


@dataclass(frozen=True)
class Attempt:
    """What one call of `deliver` did; `retry_in` is set when another attempt is scheduled."""

    delivery_id: str
    outcome: Outcome
    attempts: int = 0
    status_code: int | None = None
    error: str | None = None
    retry_in: float | None = None


@dataclass(frozen=True)
class _Claimed:
    url: str
    event: str
    tenant_id: str
    attempts: int
    body: bytes


class _PinnedHTTP(http.client.HTTPConnection):
    """Connects to the vetted address, whatever the host name resolves to now."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """TLS to the vetted address, with the URL's host for SNI and certificate checks."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self.tls)
        self.address = target.address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


def post(target: Target, body: bytes, headers: dict[str, str], timeout_s: float) -> int:
    """POST to the pinned address; the status. Plain http.client: no proxy from the
    environment, and a 3xx is the receiver's answer, never followed (a public URL must not
    bounce the request into a private network)."""
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    conn = cls(target, timeout_s)
    try:
        conn.request("POST", target.path, body=body, headers=headers)
        response = conn.getresponse()
        response.read(1024)  # drain a little; the body is not used
        return int(response.status)
    finally:
        conn.close()


def deliver(ctx: WorkerContext, delivery_id: str) -> Attempt:
    """Make one attempt at delivery `delivery_id`, unless it is delivered, given up, or not
    due (another attempt holds it): 2xx delivers it; anything else schedules a retry after
    `webhook_backoff_s * 2**(attempts - 1)`, or gives up after `webhook_max_attempts`."""
    settings = ctx.settings
    claimed = _claim(ctx, delivery_id)
    if claimed is None:
        return Attempt(delivery_id, "skipped")

    secret = webhook_secret(settings, claimed.tenant_id)
    if not secret:
        logger.error("webhook %s not sent: set LPD_SIGNED_URL_SECRET", delivery_id)
        return _record(ctx, delivery_id, claimed.attempts, None, NO_SECRET, retry=False)
    try:
        target = validate_callback_url(claimed.url, settings)
    except InvalidCallbackUrl as exc:
        refused = f"callback URL refused: {exc}"
        return _record(ctx, delivery_id, claimed.attempts, None, refused, retry=exc.retryable)

    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_HEADER: claimed.event,
        DELIVERY_HEADER: delivery_id,
        SIGNATURE_HEADER: sign(secret, claimed.body),
    }
    status: int | None = None
    error: str | None = None
    try:
        status = post(target, claimed.body, headers, settings.webhook_timeout_s)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if status is not None and 200 <= status < 300:
        return _record(ctx, delivery_id, claimed.attempts, status, None, retry=False)
    return _record(ctx, delivery_id, claimed.attempts, status, error or f"HTTP {status}", True)


def sweep(ctx: WorkerContext) -> list[str]:
    """Publish every due delivery: new rows the API recorded (a cancel), retries whose message
    was lost, and rows claimed by a worker that died. Run by beat every few seconds."""
    with session_scope(ctx.sessions) as session:
        return dispatch_pending(session, ctx.queue)


def dispatch_job_events(ctx: WorkerContext, job_id: str) -> list[str]:
    """After a task finished job `job_id`: publish its new deliveries at once instead of
    waiting for the sweep (best effort; the sweep covers a failure)."""
    try:
        with session_scope(ctx.sessions) as session:
            return dispatch_pending(session, ctx.queue, job_id=job_id)
    except Exception as exc:
        logger.warning("job %s: webhook dispatch failed, left to the sweep: %s", job_id, exc)
        return []


# --- the row ---------------------------------------------------------------------------------


def _claim(ctx: WorkerContext, delivery_id: str) -> _Claimed | None:
    """Count an attempt and hold the row for its duration, if it is due; None otherwise."""
    now = utcnow()
    lease = timedelta(seconds=ctx.settings.webhook_timeout_s + CLAIM_MARGIN_S)
    with session_scope(ctx.sessions) as session:
        stmt = (
            update(WebhookDelivery)
            .where(
                WebhookDelivery.id == delivery_id,
                WebhookDelivery.delivered_at.is_(None),
                WebhookDelivery.next_attempt_at.is_not(None),
                WebhookDelivery.next_attempt_at <= now + DUE_SLACK,
            )
            .values(attempts=WebhookDelivery.attempts + 1, next_attempt_at=now + lease)
            .execution_options(synchronize_session=False)
        )
        if cast(CursorResult[Any], session.execute(stmt)).rowcount != 1:
            return None
        delivery = session.get(WebhookDelivery, delivery_id)
        job = session.get(Job, delivery.job_id) if delivery is not None else None
        if delivery is None or job is None:  # deleted meanwhile (cascade)
            return None
        body = event_body(delivery, job)
        return _Claimed(delivery.url, delivery.event, job.tenant_id, delivery.attempts, body)


def _record(
    ctx: WorkerContext,
    delivery_id: str,
    attempts: int,
    status: int | None,
    error: str | None,
    retry: bool,
) -> Attempt:
    settings = ctx.settings
    now = utcnow()
    values: dict[str, Any] = {"status_code": status, "last_error": _short(error)}
    retry_in: float | None = None
    if error is None:
        outcome: Outcome = "delivered"
        values.update(delivered_at=now, next_attempt_at=None)
    elif retry and attempts < settings.webhook_max_attempts:
        outcome = "retry"
        retry_in = settings.webhook_backoff_s * 2 ** (attempts - 1)
        values["next_attempt_at"] = now + timedelta(seconds=retry_in)
    else:
        outcome = "gave_up"
        values["next_attempt_at"] = None  # NULL and undelivered: given up, never due again
    with session_scope(ctx.sessions) as session:
        session.execute(  # only if no later attempt claimed the row meanwhile
            update(WebhookDelivery)
            .where(WebhookDelivery.id == delivery_id, WebhookDelivery.attempts == attempts)
            .values(**values)
            .execution_options(synchronize_session=False)
        )
    log = logger.info if outcome == "delivered" else logger.warning
    log("webhook %s attempt %d: %s %s", delivery_id, attempts, outcome, error or status)
    return Attempt(delivery_id, outcome, attempts, status, error, retry_in)


def _short(error: str | None) -> str | None:
    return None if error is None else error[:MAX_ERROR_CHARS]
