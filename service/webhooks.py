"""Webhooks, service side: which callback URLs are accepted, the event body and its HMAC
signature, the outbox row written with a job's final transition, and publishing due rows.

Delivery is at least once: receivers dedupe on `X-LPD-Delivery` (the event id).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.config import Settings
from service.errors import ApiError
from service.models import Job, JobStatus, WebhookDelivery, new_id, utcnow
from service.queue import WEBHOOK_TASK, TaskQueue
from service.schemas import JobOut

logger = logging.getLogger(__name__)

SIGNATURE_HEADER: Final = "X-LPD-Signature"
EVENT_HEADER: Final = "X-LPD-Event"
DELIVERY_HEADER: Final = "X-LPD-Delivery"
MAX_URL_LENGTH: Final = 2048
DEFAULT_TOLERANCE_S: Final = 300
# A delivery row is due a little early, so a countdown retry never misses its own slot.
DUE_SLACK: Final = timedelta(seconds=1)


# --- callback URLs ---------------------------------------------------------------------------


class InvalidCallbackUrl(ValueError):
    """A callback URL the service will not call; routes answer 422 `invalid_callback_url`.

    `retryable` is True only when the host did not resolve (DNS may come back): a worker
    retries that delivery, and gives up at once on everything else.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True)
class Target:
    """Where to POST: the URL's parts, and the one address its host was vetted at. Sending
    connects to that address, so a DNS answer that changes between the check and the send
    (rebinding) cannot redirect the request into a private network."""

    scheme: str
    host: str
    port: int
    path: str  # with the query string
    address: str


def validate_callback_url(url: str, settings: Settings) -> Target:
    """The target of `url` if the service may POST events to it, else raise
    `InvalidCallbackUrl`.

    http(s) only, at most 2048 characters, no credentials; unless
    `webhook_allow_private_hosts`, every address the host resolves to must be public, so
    that a client cannot make the workers call into their own network (SSRF).
    """
    if not isinstance(url, str) or not url:
        raise InvalidCallbackUrl("the callback URL is empty")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidCallbackUrl(f"the callback URL is longer than {MAX_URL_LENGTH} characters")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise InvalidCallbackUrl("the callback URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise InvalidCallbackUrl("the callback URL is malformed") from None
    if parts.scheme not in ("http", "https"):
        raise InvalidCallbackUrl("the callback URL must be http or https")
    if parts.username is not None or parts.password is not None or "@" in parts.netloc:
        raise InvalidCallbackUrl("the callback URL must not contain credentials")
    host = parts.hostname
    if not host:
        raise InvalidCallbackUrl("the callback URL has no host")
    port = port or (443 if parts.scheme == "https" else 80)
    addresses = _resolve(host, port)
    if not settings.webhook_allow_private_hosts:
        for address in addresses:
            if not address.is_global or address.is_multicast:
                raise InvalidCallbackUrl(
                    f"the callback host {host!r} is not a public address ({address})"
                )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port, path, str(addresses[0]))


def require_callback_url(url: str, settings: Settings) -> None:
    """`validate_callback_url` for a route: 422 `invalid_callback_url` (resolves the host)."""
    try:
        validate_callback_url(url, settings)
    except InvalidCallbackUrl as exc:
        raise ApiError(422, "invalid_callback_url", str(exc), {"callback_url": url}) from None


def _resolve(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise InvalidCallbackUrl(
            f"the callback host {host!r} does not resolve", retryable=True
        ) from None
    addresses = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        addresses.append(address)
    if not addresses:
        raise InvalidCallbackUrl(f"the callback host {host!r} has no address", retryable=True)
    return addresses


# --- signatures ------------------------------------------------------------------------------


def webhook_secret(settings: Settings, tenant_id: str) -> str:
    """Tenant `tenant_id`'s signing key, `whsec_<hex>`: derived from `signed_url_secret`, so
    one setting serves all tenants, yet a receiver holding its key can neither forge another
    tenant's events nor sign result links. Empty if no `signed_url_secret` is set."""
    master = settings.signed_url_secret.get_secret_value().encode()
    if not master:
        return ""
    derived = hmac.new(master, b"lpd-webhook-v1:" + tenant_id.encode(), hashlib.sha256)
    return f"whsec_{derived.hexdigest()}"


def _key(secret: str | bytes) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _digest(secret: str | bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(_key(secret), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()


def sign(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The `X-LPD-Signature` value: `t=<unix s>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.

    The timestamp is signed too, so a captured request cannot be replayed later.
    """
    t = int(time.time()) if timestamp is None else int(timestamp)
    return f"t={t},v1={_digest(secret, t, body)}"


def verify_signature(
    secret: str | bytes,
    header: str | None,
    body: bytes | str,
    tolerance_s: float = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """For receivers: True if `header` signs exactly `body` (the raw request bytes) with
    `secret`, at most `tolerance_s` seconds from `now`. Any `v1` may match (key rotation)."""
    if not header:
        return False
    raw = body.encode() if isinstance(body, str) else body
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, _, value = part.strip().partition("=")
        if name == "t" and value.isdigit():
            timestamp = int(value)
        elif name == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        return False
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_s:
        return False
    expected = _digest(secret, timestamp, raw)
    # As bytes: compare_digest raises on non-ASCII str; a forged header must just fail.
    wanted = expected.encode()
    return any(hmac.compare_digest(wanted, c.encode("utf-8", "replace")) for c in candidates)


# --- events and the outbox -------------------------------------------------------------------


def event_type(status: JobStatus) -> str:
    """`job.succeeded`, `job.failed` or `job.canceled`."""
    return f"job.{JobStatus(status).value}"


def record_event(session: Session, job_id: str, status: JobStatus) -> str | None:
    """Add the outbox row for a job that just reached `status`, if it has a callback URL; the
    caller's commit sends it with the status change (or neither). Returns the delivery id."""
    url = session.scalar(select(Job.callback_url).where(Job.id == job_id))
    if not url:
        return None
    delivery = WebhookDelivery(
        id=new_id(),
        job_id=job_id,
        event=event_type(status),
        url=url,
        attempts=0,
        next_attempt_at=utcnow(),  # due now; NULL once delivered or given up
    )
    session.add(delivery)
    session.flush()
    return delivery.id


def event_body(delivery: WebhookDelivery, job: Job) -> bytes:
    """The JSON POSTed for `delivery`: built from the (final, so unchanging) job row at send
    time, identical on every attempt."""
    event = {
        "id": delivery.id,
        "type": delivery.event,
        "created_at": delivery.created_at.isoformat(),
        "data": {"job": JobOut.of(job).model_dump(mode="json")},
    }
    return json.dumps(event, separators=(",", ":"), sort_keys=True).encode()


def due_deliveries(
    session: Session,
    *,
    job_id: str | None = None,
    now: datetime | None = None,
    limit: int = 500,
) -> list[str]:
    """Ids of undelivered, not given up deliveries whose next attempt is due, oldest first."""
    stmt = select(WebhookDelivery.id).where(
        WebhookDelivery.delivered_at.is_(None),
        WebhookDelivery.next_attempt_at.is_not(None),
        WebhookDelivery.next_attempt_at <= (now or utcnow()) + DUE_SLACK,
    )
    if job_id is not None:
        stmt = stmt.where(WebhookDelivery.job_id == job_id)
    stmt = stmt.order_by(WebhookDelivery.next_attempt_at).limit(limit)
    return list(session.scalars(stmt))


def dispatch_pending(
    session: Session, queue: TaskQueue, *, job_id: str | None = None, limit: int = 500
) -> list[str]:
    """Publish a delivery task for each due row (of `job_id`, or all); call after commit.

    Best effort: a broker error stops the loop and is logged, and the periodic sweep
    publishes the rest. A row published twice is still sent once (the task claims it).
    """
    sent: list[str] = []
    for delivery_id in due_deliveries(session, job_id=job_id, limit=limit):
        try:
            queue.enqueue(WEBHOOK_TASK, delivery_id)
        except Exception as exc:
            logger.warning("webhook %s: publish failed, left to the sweep: %s", delivery_id, exc)
            break
        sent.append(delivery_id)
    return sent
