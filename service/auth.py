"""Tenants and API keys: `lpd_<prefix>_<secret>` bearer keys, stored as the secret's sha256.

The secret is 256 random bits, so a fast hash is enough (nothing to brute-force); the prefix
is public and only finds the row. Keys are made by the admin CLI (service/admin.py).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.models import ApiKey, Tenant, utcnow

KEY_SCHEME: Final = "lpd"
PREFIX_BYTES: Final = 6  # 12 hex characters
SECRET_BYTES: Final = 32
TENANT_NAME: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEY: Final = re.compile(r"^lpd_([0-9a-f]{12})_([A-Za-z0-9_-]{16,128})$")
# Compared against when the prefix is unknown, so a miss costs the same as a wrong secret.
_DUMMY_SHA256: Final = hashlib.sha256(b"no such key").hexdigest()


class AuthenticationError(Exception):
    """The Authorization header is missing, malformed, unknown or revoked (the API says 401)."""


@dataclass(frozen=True)
class Principal:
    """Who is calling: every query the API makes is filtered by `tenant_id`."""

    tenant_id: str
    key_id: str
    rate_limit_per_minute: int | None = None  # the key's override; None: Settings' default


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_tenant(session: Session, name: str) -> Tenant:
    """Add a tenant; raises ValueError for a bad or taken name."""
    if not TENANT_NAME.fullmatch(name):
        raise ValueError(f"tenant name must match {TENANT_NAME.pattern}, got {name!r}")
    if find_tenant(session, name) is not None:
        raise ValueError(f"tenant {name!r} already exists")
    tenant = Tenant(name=name)
    session.add(tenant)
    session.flush()
    return tenant


def find_tenant(session: Session, name: str) -> Tenant | None:
    return session.scalar(select(Tenant).where(Tenant.name == name))


def create_api_key(
    session: Session, tenant: Tenant, name: str, *, rate_limit_per_minute: int | None = None
) -> tuple[str, ApiKey]:
    """A new key for `tenant`: (the plaintext, shown once and never stored; the row)."""
    name = name.strip()
    if not name or len(name) > 100:
        raise ValueError("key name must be 1-100 characters")
    if rate_limit_per_minute is not None and rate_limit_per_minute < 1:
        raise ValueError("rate limit must be at least 1 request per minute")
    prefix = secrets.token_hex(PREFIX_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    key = ApiKey(
        tenant_id=tenant.id,
        prefix=prefix,
        secret_sha256=hash_secret(secret),
        name=name,
        rate_limit_per_minute=rate_limit_per_minute,
    )
    session.add(key)
    session.flush()
    return f"{KEY_SCHEME}_{prefix}_{secret}", key


def revoke_api_key(session: Session, prefix: str) -> ApiKey:
    """Revoke the key with `prefix` (idempotent); raises LookupError if there is none."""
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    if key is None:
        raise LookupError(f"no API key with prefix {prefix!r}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def list_api_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys, oldest first, revoked ones included."""
    stmt = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
    return list(session.scalars(stmt))


def parse_bearer(header_value: str | None) -> tuple[str, str]:
    """`Bearer lpd_<prefix>_<secret>` -> (prefix, secret); AuthenticationError if malformed."""
    if not header_value:
        raise AuthenticationError("missing Authorization header")
    scheme, _, token = header_value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthenticationError("Authorization must be 'Bearer <API key>'")
    match = _KEY.fullmatch(token.strip())
    if match is None:
        raise AuthenticationError("malformed API key")
    return match.group(1), match.group(2)


def authenticate(session: Session, header_value: str | None) -> Principal:
    """The caller behind an Authorization header value; AuthenticationError if none."""
    prefix, secret = parse_bearer(header_value)
    key = session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
    expected = key.secret_sha256 if key is not None else _DUMMY_SHA256
    if not hmac.compare_digest(expected, hash_secret(secret)) or key is None:
        raise AuthenticationError("invalid API key")
    if key.revoked_at is not None:
        raise AuthenticationError("API key revoked")
    return Principal(key.tenant_id, key.id, key.rate_limit_per_minute)
