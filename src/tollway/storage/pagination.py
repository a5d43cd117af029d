"""Keyset (cursor) pagination, newest first.

Pages are ordered by (timestamp desc, id desc); the cursor is the position of the
last item shown, so a page costs one indexed range scan however deep it is, and
rows inserted meanwhile neither shift pages nor cause duplicates or gaps (unlike
OFFSET). The id breaks ties between rows with the same timestamp.

Cursors are opaque to callers: url-safe base64 of a small JSON array. A cursor that
does not decode raises InvalidInput(field="cursor") so that the API answers 422.
"""

from __future__ import annotations

import base64
import binascii
import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from tollway.identity.errors import InvalidInput

DEFAULT_LIMIT = 50
MAX_LIMIT = 200

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    # None on the last page.
    next_cursor: str | None


def clamp_limit(limit: int | None) -> int:
    """The page size actually used: DEFAULT_LIMIT for None, else within 1..MAX_LIMIT."""
    if limit is None:
        return DEFAULT_LIMIT
    return max(1, min(int(limit), MAX_LIMIT))


def encode_cursor(ts: datetime, ident: uuid.UUID | int) -> str:
    """The cursor that continues after the item at (ts, ident)."""
    value: str | int = str(ident) if isinstance(ident, uuid.UUID) else int(ident)
    raw = json.dumps([ts.isoformat(), value], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(cursor: str, id_type: type[Any] = uuid.UUID) -> tuple[datetime, Any]:
    """(ts, id) from a cursor; InvalidInput(field="cursor") when it is not one of ours."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
        if not isinstance(data, list) or len(data) != 2 or not isinstance(data[0], str):
            raise ValueError("not a cursor")
        ts = datetime.fromisoformat(data[0])
        if ts.tzinfo is None:
            raise ValueError("naive timestamp")
        # Converted here, where an overflow (a time before year 1 in UTC) is a bad
        # cursor, rather than when the query binds it (a 500).
        ts = ts.astimezone(UTC)
        ident: Any
        if id_type is uuid.UUID:
            if not isinstance(data[1], str):
                raise ValueError("bad id")
            ident = uuid.UUID(data[1])
        else:
            if not isinstance(data[1], int) or isinstance(data[1], bool):
                raise ValueError("bad id")
            ident = data[1]
    except (ValueError, TypeError, OverflowError, UnicodeError, binascii.Error) as exc:
        raise InvalidInput("invalid cursor", field="cursor") from exc
    return ts, ident


async def keyset_page(
    session: AsyncSession,
    stmt: Select[T],
    *,
    ts_column: InstrumentedAttribute[datetime],
    id_column: InstrumentedAttribute[Any],
    cursor: str | None,
    limit: int | None,
) -> Page[T]:
    """One page of `stmt` (a select of one ORM entity, filters already applied).

    `ts_column` and `id_column` are that entity's mapped attributes; the items'
    attributes of the same names make the next cursor.
    """
    size = clamp_limit(limit)
    if cursor is not None:
        ts, ident = decode_cursor(cursor, id_column.type.python_type)
        stmt = stmt.where(or_(ts_column < ts, and_(ts_column == ts, id_column < ident)))
    # One extra row tells whether another page follows, without a COUNT.
    stmt = stmt.order_by(ts_column.desc(), id_column.desc()).limit(size + 1)
    items = list((await session.scalars(stmt)).all())
    if len(items) <= size:
        return Page(items=items, next_cursor=None)
    items = items[:size]
    last = items[-1]
    return Page(
        items=items,
        next_cursor=encode_cursor(getattr(last, ts_column.key), getattr(last, id_column.key)),
    )
