"""Keyset paging, newest first: an opaque cursor holds the (created_at, id) of the last row
seen, so pages stay stable while rows are added (unlike offsets)."""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any, Final, TypeVar

from fastapi import Query
from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import InstrumentedAttribute, Session

from service.errors import ApiError

T = TypeVar("T")

MAX_LIMIT: Final = 100

LimitQuery = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Items per page.")]
CursorQuery = Annotated[
    str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
]


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) in `cursor`; 422 `invalid_cursor` for anything we did not make."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, row_id = json.loads(raw)
        when = datetime.fromisoformat(created)
        if when.tzinfo is None or not isinstance(row_id, str):
            raise ValueError(cursor)
        return when, row_id
    except (ValueError, TypeError, binascii.Error, json.JSONDecodeError):
        raise ApiError(422, "invalid_cursor", "the cursor is not one this API returned") from None


def fetch_page(
    session: Session,
    stmt: Select[T],
    created_at: InstrumentedAttribute[Any],
    row_id: InstrumentedAttribute[Any],
    limit: int,
    cursor: str | None,
) -> tuple[list[T], str | None]:
    """Rows of `stmt` after `cursor`, newest first, and the cursor of the next page."""
    if cursor is not None:
        when, last_id = decode_cursor(cursor)
        stmt = stmt.where(or_(created_at < when, and_(created_at == when, row_id < last_id)))
    rows = list(session.scalars(stmt.order_by(created_at.desc(), row_id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(getattr(last, created_at.key), getattr(last, row_id.key))
