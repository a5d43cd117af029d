"""One batch of usage events into the database: raw rows and hourly rollups, atomically.

A batch is written in one transaction: one bulk insert into usage_records and one
executemany upsert into usage_hourly (the batch aggregated in Python per hour,
consumer, key and route first, so a batch of 1000 requests on one route is one
rollup row). The upsert adds to the stored counts in the database
(`requests = usage_hourly.requests + excluded.requests`), so several workers or
nodes writing the same rollup row stay exact; rows are upserted in primary-key
order so that two writers never lock the same rows in opposite orders (deadlock).

Exactly once on PostgreSQL. A write that times out or loses its connection may
still have committed (the COMMIT reached the server, its answer did not come
back). So the batch's ids are taken from the usage_records sequence before its
first attempt and kept across retries: a retry first looks for the batch's first
id (the transaction is atomic, so one id tells for the whole batch), and if an
earlier attempt is still in flight on a stalled connection, the primary key makes
the retry's INSERT wait for it, then fail (it committed) or proceed (it rolled
back). On SQLite a write is never cancelled (see recorder.py), so its outcome is
always known and the database assigns the ids.

Cost. The writer runs on the gateway's event loop, so the per-row work it does
there is per-request overhead. Going through SQLAlchemy's per-row parameter
processing cost about 20 us of loop time per row (measured: 21-24 ms per batch of
1000 on either backend), a fifth of a core at 10,000 requests/s. So rows are
built as plain tuples, and the bulk insert bypasses that processing: on
PostgreSQL a binary COPY through asyncpg (in the same transaction), on SQLite a
driver-level executemany (run in aiosqlite's thread) with values converted once by
SQLAlchemy's own bind processors, so that they are stored exactly as the ORM
stores and finds them.
"""

from __future__ import annotations

import math
import uuid
from bisect import bisect_left
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table, select, text
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DataError, DBAPIError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.dml import Insert

from tollway.storage.database import Database, insert_for
from tollway.storage.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    UsageHourly,
    UsageRecord,
)
from tollway.usage.events import UsageEvent

RECORDS: Table = UsageRecord.__table__  # type: ignore[assignment]
HOURLY: Table = UsageHourly.__table__  # type: ignore[assignment]

_INT64_MAX = 2**63 - 1
# Rollup columns an upsert adds to (everything but the primary key).
_SUMMED = (
    "requests", "errors", "latency_ms_sum", "bytes_in", "bytes_out", *LATENCY_BUCKET_COLUMNS,
)  # fmt: skip
_PK = ("hour", "consumer_id", "key_id", "route")
# usage_records columns in the order event_row builds them (id comes from the
# database on SQLite, from the batch on PostgreSQL).
RECORD_COLUMNS = (
    "ts", "consumer_id", "key_id", "route", "method", "path", "status",
    "upstream_latency_ms", "latency_ms", "bytes_in", "bytes_out", "request_id", "client_ip",
)  # fmt: skip
_TS, _CONSUMER, _KEY, _ROUTE = 0, 1, 2, 3
_STATUS, _LATENCY, _BYTES_IN, _BYTES_OUT = 6, 8, 9, 10
Row = tuple[Any, ...]


def _limit(column: str) -> int:
    length = getattr(RECORDS.c[column].type, "length", None)
    assert isinstance(length, int)
    return length


_LIMITS = {name: _limit(name) for name in ("route", "method", "path", "request_id", "client_ip")}
_ROUTE_KEY_LIMIT = getattr(HOURLY.c["route"].type, "length", 200)


@dataclass(slots=True)
class Batch:
    """Rows taken off the queue, written together; kept (with its ids) until written."""

    rows: list[Row]
    # PostgreSQL: ids from the sequence, taken before the first attempt.
    ids: list[int] | None = None
    attempts: int = 0

    def __len__(self) -> int:
        return len(self.rows)

    def split(self) -> tuple[Batch, Batch]:
        """Two halves, each with its own ids: isolates a row the database refuses."""
        mid = len(self.rows) // 2
        left_ids = self.ids[:mid] if self.ids is not None else None
        right_ids = self.ids[mid:] if self.ids is not None else None
        return (
            Batch(self.rows[:mid], left_ids, self.attempts),
            Batch(self.rows[mid:], right_ids, self.attempts),
        )


def _text(value: object, column: str) -> str | None:
    if value is None:
        return None
    limit = _LIMITS[column]
    # The usual case, checked cheaply: a short ASCII str without NUL.
    if type(value) is str and len(value) <= limit and value.isascii() and "\x00" not in value:
        return value
    text = str(value)[:limit]
    # PostgreSQL text cannot hold NUL, and no UTF-8 holds a lone surrogate.
    if "\x00" in text:
        text = text.replace("\x00", "")
    if not text.isascii():
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


def _count(value: object) -> int:
    if type(value) is int and 0 <= value <= _INT64_MAX:
        return value
    number: int = int(value)  # type: ignore[call-overload]
    return max(0, min(number, _INT64_MAX))


def _ms(value: object) -> float:
    if type(value) is float and 0.0 <= value < math.inf:  # NaN fails this too
        return value
    number = float(value)  # type: ignore[arg-type]
    return number if math.isfinite(number) and number >= 0 else 0.0


def _uuid(value: object) -> uuid.UUID:
    return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))


def event_row(event: UsageEvent) -> Row:
    """The usage_records row for an event (RECORD_COLUMNS order), made safe to insert.

    A value the column cannot hold (a path longer than the column, a NUL byte, a
    naive timestamp, a negative size) would fail the whole batch at every retry;
    so strings are cut to their column and cleaned, timestamps made UTC, numbers
    clamped. Raises only for something that is not a usage event at all.
    """
    ts = event.ts
    if not isinstance(ts, datetime):
        ts = datetime.fromtimestamp(ts, UTC)
    elif ts.tzinfo is not UTC:
        ts = ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts.astimezone(UTC)
    status = event.status
    if type(status) is not int or not 0 <= status <= 999:
        status = max(0, min(int(status), 999))
    upstream = event.upstream_latency_ms
    return (
        ts,
        _uuid(event.consumer_id),
        None if event.key_id is None else _uuid(event.key_id),
        _text(event.route, "route"),
        _text(event.method, "method") or "",
        _text(event.path, "path") or "",
        status,
        None if upstream is None else _ms(upstream),
        _ms(event.latency_ms),
        _count(event.bytes_in),
        _count(event.bytes_out),
        _text(event.request_id, "request_id"),
        _text(event.client_ip, "client_ip"),
    )


def latency_bucket(latency_ms: float) -> int:
    """Index of the lat_bNN column counting this latency (bucket upper bounds inclusive)."""
    return bisect_left(LATENCY_BUCKET_BOUNDS_MS, latency_ms)


def rollup_rows(rows: list[Row]) -> list[dict[str, Any]]:
    """The batch aggregated per (hour, consumer, key, route), in primary-key order."""
    # Grouped on cheap keys (the hour's fields, the UUID objects); the datetimes and
    # strings the table wants are made once per group, not once per row.
    acc: dict[tuple[Any, ...], list[Any]] = {}
    bounds = LATENCY_BUCKET_BOUNDS_MS
    for row in rows:
        ts = row[_TS]
        latency = row[_LATENCY]
        key = row[_KEY]
        # UUIDs by their int: hashing a UUID object is a Python-level call.
        group = (ts.year, ts.month, ts.day, ts.hour, row[_CONSUMER].int,
                 -1 if key is None else key.int, row[_ROUTE])
        sums = acc.get(group)
        if sums is None:
            sums = acc[group] = [0, 0, 0.0, 0, 0, [0] * len(bounds), row[_CONSUMER], key]
        sums[0] += 1
        if row[_STATUS] >= 400:
            sums[1] += 1
        sums[2] += latency
        sums[3] += row[_BYTES_IN]
        sums[4] += row[_BYTES_OUT]
        sums[5][bisect_left(bounds, latency)] += 1
    out: list[dict[str, Any]] = []
    for (year, month, day, hour, _, _, route), sums in acc.items():
        consumer_id, key_id = sums[6], sums[7]
        values: dict[str, Any] = {
            "hour": datetime(year, month, day, hour, tzinfo=UTC),
            "consumer_id": consumer_id,
            "key_id": "" if key_id is None else str(key_id),
            "route": (route or "")[:_ROUTE_KEY_LIMIT],
            "requests": sums[0],
            "errors": sums[1],
            "latency_ms_sum": float(sums[2]),
            "bytes_in": min(sums[3], _INT64_MAX),
            "bytes_out": min(sums[4], _INT64_MAX),
        }
        for column, count in zip(LATENCY_BUCKET_COLUMNS, sums[5], strict=True):
            values[column] = count
        out.append(values)
    # Primary-key order: concurrent writers lock shared rows in the same order.
    out.sort(key=lambda v: (v["hour"], str(v["consumer_id"]), v["key_id"], v["route"]))
    return out


def _upsert(dialect: str) -> Insert:
    stmt = insert_for(dialect, HOURLY)
    # Added in the database, not read-modify-written here: exact with many writers.
    return stmt.on_conflict_do_update(
        index_elements=[HOURLY.c[c] for c in _PK],
        set_={c: HOURLY.c[c] + stmt.excluded[c] for c in _SUMMED},
    )


_UPSERTS: dict[str, Insert] = {}


def upsert_statement(dialect: str) -> Insert:
    stmt = _UPSERTS.get(dialect)
    if stmt is None:
        stmt = _UPSERTS[dialect] = _upsert(dialect)
    return stmt


async def _allocate_ids(conn: AsyncConnection, count: int) -> list[int]:
    # pg_get_serial_sequence finds the sequence of a serial or identity column by
    # table name, through the search_path, whatever the migration named it.
    # One array, not one row per id: a thousand rows through the result machinery
    # cost milliseconds of loop time.
    ids = await conn.scalar(
        text(
            "SELECT array_agg(nextval(pg_get_serial_sequence('usage_records', 'id'))) "
            "FROM generate_series(1, :n)"
        ),
        {"n": count},
    )
    return [int(v) for v in ids]


async def _already_written(conn: AsyncConnection, first_id: int) -> bool:
    found = await conn.scalar(select(RECORDS.c.id).where(RECORDS.c.id == first_id))
    return found is not None


_SQLITE_INSERT = (
    f"INSERT INTO usage_records ({', '.join(RECORD_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in RECORD_COLUMNS)})"
)
_processors: dict[str, list[tuple[int, Any]]] = {}


def _bind_processors(dialect: Dialect) -> list[tuple[int, Any]]:
    """(column index, SQLAlchemy's bind processor) for the columns that have one."""
    found = _processors.get(dialect.name)
    if found is None:
        found = []
        for i, name in enumerate(RECORD_COLUMNS):
            proc = RECORDS.c[name].type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                found.append((i, proc))
        _processors[dialect.name] = found
    return found


async def _insert_sqlite(conn: AsyncConnection, rows: list[Row]) -> None:
    procs = _bind_processors(conn.dialect)
    params = []
    for row in rows:
        values = list(row)
        for i, proc in procs:
            value = values[i]
            if value is not None:
                values[i] = proc(value)
        params.append(tuple(values))
    await conn.exec_driver_sql(_SQLITE_INSERT, params)


async def _insert_postgres(
    conn: AsyncConnection, driver: Any, rows: list[Row], ids: list[int]
) -> None:
    # The transaction is already open on this connection (the id statement ran
    # first through SQLAlchemy), so the COPY commits or rolls back with the batch.
    await driver.copy_records_to_table(
        "usage_records",
        records=[(ident, *row) for ident, row in zip(ids, rows, strict=True)],
        columns=("id", *RECORD_COLUMNS),
    )


async def write_batch(
    database: Database, batch: Batch, connections: list[Any] | None = None
) -> bool:
    """Write the batch (rows and rollups) in one transaction.

    Returns False when an earlier attempt turns out to have committed it already
    (PostgreSQL retries only), True when this call wrote it. On PostgreSQL the
    driver connection it writes on is appended to `connections`, so that a caller
    whose attempt stalls can close it hard (recorder.py says why).
    """
    if not batch.rows:
        return True
    async with database.engine.begin() as conn:
        if database.dialect == "postgresql":
            driver: Any = (await conn.get_raw_connection()).driver_connection
            if connections is not None:
                connections.append(driver)
            # Always a statement through SQLAlchemy first: it opens the transaction
            # that the COPY below joins.
            if batch.ids is None:
                batch.ids = await _allocate_ids(conn, len(batch.rows))
            elif await _already_written(conn, batch.ids[0]):
                return False
            await _insert_postgres(conn, driver, batch.rows, batch.ids)
        else:
            await _insert_sqlite(conn, batch.rows)
        await conn.execute(upsert_statement(database.dialect), rollup_rows(batch.rows))
    return True


def is_poison(exc: BaseException) -> bool:
    """True when retrying cannot help: the database refuses a value in the batch.

    A data exception (SQLSTATE class 22 on PostgreSQL, DataError elsewhere): a
    value out of range or not storable. A StatementError that is not a DBAPIError:
    a bind parameter that could not even be converted. Connection failures,
    timeouts, deadlocks, lock waits and constraint races are all worth a retry.
    """
    if isinstance(exc, DataError):
        return True
    if isinstance(exc, DBAPIError):
        # SQLAlchemy's asyncpg adapter raises a generic DBAPIError for data
        # exceptions; the SQLSTATE tells them apart.
        return _data_exception(getattr(exc.orig, "sqlstate", None))
    if isinstance(exc, StatementError):
        return True
    # The COPY goes to asyncpg directly: its errors come unwrapped.
    return _data_exception(getattr(exc, "sqlstate", None))


def _data_exception(sqlstate: object) -> bool:
    return isinstance(sqlstate, str) and sqlstate.startswith("22")
