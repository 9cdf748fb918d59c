"""Idempotency-Key on POSTs: the first response to a key is stored and replayed to its retries.

A route validates the request, fingerprints it (`request_fingerprint`) and calls `begin`:
it gets a `Replay` of the stored response, a typed 409/422, or a `Claim` on the key, which it
ends with `complete` (response stored) or `abandon` (row removed, so a retry runs afresh). The
unique (tenant_id, key) constraint settles two first requests racing for one key.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Final

import anyio
from fastapi import Depends, Header, Request
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse
from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from service.config import Settings
from service.db import session_scope
from service.errors import ApiError
from service.models import IdempotencyRecord, utcnow

logger = logging.getLogger(__name__)

ACCEPTED: Final = 202  # what the create routes answer (and replay)

HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
_KEY: Final = re.compile(r"[\x20-\x7e]{1,255}")  # printable ASCII, as long as the column
_CLAIM_ATTEMPTS: Final = 3  # a lost insert race re-reads the winner's row
_CHUNK: Final = 1024 * 1024


def idempotency_key(
    key: Annotated[
        str | None,
        Header(
            alias=HEADER,
            description="Makes a retried POST safe: a repeat with the same key and request "
            "replays the first response (`Idempotent-Replayed: true`) instead of acting twice. "
            "1-255 printable ASCII characters, e.g. a UUID; kept 24 h.",
        ),
    ] = None,
) -> str | None:
    """The request's Idempotency-Key, or None; 422 `invalid_idempotency_key` if malformed."""
    if key is not None and (not key.strip() or not _KEY.fullmatch(key)):
        raise ApiError(
            422,
            "invalid_idempotency_key",
            f"{HEADER} must be 1-255 printable ASCII characters",
        )
    return key


IdempotencyKeyDep = Annotated[str | None, Depends(idempotency_key)]


# --- fingerprints ----------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in chunks (uploads may be large)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def request_fingerprint(
    method: str,
    path: str,
    fields: Mapping[str, str],
    files: Mapping[str, Sequence[Path]],
) -> str:
    """sha256 of the request as parsed: method, path, form fields (sorted) and each uploaded
    file's sha256 by field, in upload order. Reads the files: call it off the event loop."""
    canonical = {
        "method": method.upper(),
        "path": path,
        "fields": sorted(fields.items()),
        "files": {name: [file_sha256(p) for p in paths] for name, paths in files.items() if paths},
    }
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --- records ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Replay:
    """The stored first response to a key."""

    status: int
    body: Any

    def response(self, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(
            self.body, status_code=self.status, headers={**(headers or {}), REPLAYED_HEADER: "true"}
        )


@dataclass(frozen=True)
class Claim:
    """This request holds the key: end with `complete` or `abandon`."""

    record_id: str


def begin(
    sessions: sessionmaker[Session],
    tenant_id: str,
    key: str,
    fingerprint: str,
    settings: Settings,
) -> Replay | Claim:
    """Claim `key` for this request, or answer for it from its record.

    Replay: the first request with this key and fingerprint finished. 409
    `idempotency_in_progress`: it is still running. 422 `idempotency_key_reused`: the key came
    with a different request. Records older than `idempotency_ttl_s`, and first requests in
    flight longer than `idempotency_stale_s` (their process died), count as absent.
    """
    for _ in range(_CLAIM_ATTEMPTS):
        try:
            with session_scope(sessions) as session:
                record = session.scalar(
                    select(IdempotencyRecord).where(
                        IdempotencyRecord.tenant_id == tenant_id, IdempotencyRecord.key == key
                    )
                )
                if record is not None:
                    if not _is_dead(record, settings):
                        return _answer(record, fingerprint, settings)
                    # Core delete: a racing request may have removed it already.
                    session.execute(
                        delete(IdempotencyRecord).where(IdempotencyRecord.id == record.id)
                    )
                claimed = IdempotencyRecord(
                    tenant_id=tenant_id, key=key, request_sha256=fingerprint
                )
                session.add(claimed)
            return Claim(claimed.id)
        except IntegrityError:
            continue  # another request inserted the key first: answer from its row
    raise _in_progress(settings)


def complete(sessions: sessionmaker[Session], claim: Claim, status: int, body: Any) -> None:
    """Store the response (a JSON-able body) that retries of the key will get."""
    with session_scope(sessions) as session:
        stored = session.execute(
            update(IdempotencyRecord)
            .where(
                IdempotencyRecord.id == claim.record_id,
                IdempotencyRecord.response_status.is_(None),
            )
            .values(response_status=status, response_body=body)
        )
    if getattr(stored, "rowcount", 1) == 0:
        logger.warning("idempotency record %s was gone before completion", claim.record_id)


def complete_or_log(sessions: sessionmaker[Session], claim: Claim, status: int, body: Any) -> None:
    """`complete`, for a route whose work is done: a database error is logged, not raised
    (the resource exists and the client should hear so; a retry gets 409 until the claim
    goes stale, then runs again)."""
    try:
        complete(sessions, claim, status, body)
    except SQLAlchemyError as exc:
        logger.warning("storing the idempotent response %s failed: %s", claim.record_id, exc)


def abandon(sessions: sessionmaker[Session], claim: Claim) -> None:
    """Forget the claim after a failure, so that a retry with the key runs again."""
    with session_scope(sessions) as session:
        session.execute(
            delete(IdempotencyRecord).where(
                IdempotencyRecord.id == claim.record_id,
                IdempotencyRecord.response_status.is_(None),
            )
        )


def purge_idempotency(session: Session, older_than: datetime) -> int:
    """Delete records created before `older_than` (e.g. now - idempotency_ttl_s); the count."""
    result = session.execute(
        delete(IdempotencyRecord).where(IdempotencyRecord.created_at < older_than)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def _is_dead(record: IdempotencyRecord, settings: Settings) -> bool:
    age = utcnow() - record.created_at
    if age > timedelta(seconds=settings.idempotency_ttl_s):
        return True
    return record.response_status is None and age > timedelta(seconds=settings.idempotency_stale_s)


def _answer(record: IdempotencyRecord, fingerprint: str, settings: Settings) -> Replay:
    if record.request_sha256 != fingerprint:
        raise ApiError(
            422,
            "idempotency_key_reused",
            f"this {HEADER} was used with a different request; use a new key",
        )
    if record.response_status is None:
        raise _in_progress(settings)
    return Replay(record.response_status, record.response_body)


def _in_progress(settings: Settings) -> ApiError:
    return ApiError(
        409,
        "idempotency_in_progress",
        f"a request with this {HEADER} is still in progress; retry later",
        headers={"Retry-After": str(settings.retry_after_s)},
    )


class IdempotentRequest:
    """A create route's Idempotency-Key, start to end, for routes that parse the upload
    first (the fingerprint covers the files): `replay` after validation gives the stored
    response of an earlier identical request, or claims the key; `done` stores this
    response; `failed` frees the key so that a retry runs again."""

    def __init__(
        self, sessions: sessionmaker[Session], tenant_id: str, key: str | None, settings: Settings
    ) -> None:
        self.sessions, self.tenant_id, self.key, self.settings = sessions, tenant_id, key, settings
        self.claim: Claim | None = None

    async def replay(
        self,
        request: Request,
        fields: Mapping[str, str],
        files: Mapping[str, Sequence[Path]],
        location: Callable[[Any], str],
    ) -> JSONResponse | None:
        """The first response again (`location(body)` its Location), or None: go on."""
        if self.key is None:
            return None
        fingerprint = await run_in_threadpool(
            request_fingerprint, request.method, request.url.path, fields, files
        )
        outcome = await run_in_threadpool(
            begin, self.sessions, self.tenant_id, self.key, fingerprint, self.settings
        )
        if isinstance(outcome, Replay):
            return outcome.response({"Location": location(outcome.body)})
        self.claim = outcome
        return None

    async def done(self, status: int, body: Any) -> None:
        if self.claim is not None:
            stored = jsonable_encoder(body)
            await run_in_threadpool(complete_or_log, self.sessions, self.claim, status, stored)

    async def failed(self) -> None:
        if self.claim is not None:
            with anyio.CancelScope(shield=True):  # a retry must not find the key in flight
                await run_in_threadpool(abandon, self.sessions, self.claim)
