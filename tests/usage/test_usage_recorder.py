"""The usage recorder against a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event as sa_event
from sqlalchemy import func, select
from usage_helpers import (
    BASE_TS,
    count_records,
    event,
    request_ids,
    rollup_sums,
    until,
    usage_settings,
)

from support.gateway import free_port
from tollway.storage.database import Database
from tollway.storage.models import LATENCY_BUCKET_COLUMNS, UsageHourly, UsageRecord
from tollway.usage.recorder import UsageRecorder
from tollway.usage.writer import latency_bucket

CONSUMERS = [uuid.UUID(int=i) for i in (1, 2, 3)]
KEYS = [uuid.UUID(int=100 + i) for i in (1, 2)]
ROUTES = ["images", "text", "video", None]
LATENCIES = [0.4, 3.0, 42.0, 180.0, 2500.0, 90_000.0]


def varied(n: int) -> Any:
    """Event n of a mixed workload: 3 consumers, 2 keys, 4 routes, 3 hours, errors."""
    return event(
        n,
        ts=BASE_TS + timedelta(minutes=(n * 7) % 180, microseconds=n),
        consumer_id=CONSUMERS[n % 3],
        key_id=KEYS[n % 2],
        route=ROUTES[n % 4],
        status=(200, 201, 404, 500, 429)[n % 5],
        latency_ms=LATENCIES[n % 6],
        bytes_in=n % 50,
        bytes_out=n % 300,
    )


def count_commits(database: Database) -> list[int]:
    """One entry per transaction the engine commits."""
    commits: list[int] = []
    sa_event.listen(database.engine.sync_engine, "commit", lambda conn: commits.append(1))
    return commits


async def test_ten_thousand_events_are_ten_thousand_rows_in_batches(database: Database) -> None:
    commits = count_commits(database)
    recorder = UsageRecorder(database, usage_settings(usage_batch_size=1000))
    recorder.start()
    events = [varied(n) for n in range(10_000)]
    for e in events:
        recorder.record(e)
    await until(lambda: recorder.written == 10_000, what="10,000 written")
    await recorder.stop(5)

    assert await count_records(database) == 10_000
    assert sorted(await request_ids(database)) == sorted(f"req-{n}" for n in range(10_000))
    assert recorder.dropped == 0
    assert recorder.write_errors == 0
    assert recorder.pending == 0
    # Batches, not rows: ten transactions of 1000 rows (raw rows and rollups each).
    assert len(commits) == 10

    sums = await rollup_sums(database)
    assert sums["requests"] == 10_000
    assert sums["errors"] == sum(1 for e in events if e.status >= 400)
    assert sum(sums[c] for c in LATENCY_BUCKET_COLUMNS) == 10_000
    expected_buckets = Counter(latency_bucket(e.latency_ms) for e in events)
    for i, column in enumerate(LATENCY_BUCKET_COLUMNS):
        assert sums[column] == expected_buckets[i], column

    # Each rollup row is exact for its (hour, consumer, key, route).
    expected: Counter[tuple[datetime, uuid.UUID, str, str]] = Counter(
        (
            e.ts.replace(minute=0, second=0, microsecond=0),
            e.consumer_id,
            str(e.key_id),
            e.route or "",
        )
        for e in events
    )
    async with database.sessions() as session:
        rows = (await session.execute(select(
            UsageHourly.hour, UsageHourly.consumer_id, UsageHourly.key_id,
            UsageHourly.route, UsageHourly.requests, UsageHourly.bytes_out,
        ))).all()
    assert {(r.hour, r.consumer_id, r.key_id, r.route): r.requests for r in rows} == dict(expected)
    assert sum(r.bytes_out for r in rows) == sum(e.bytes_out for e in events)


async def test_full_queue_drops_the_oldest_and_counts_them(database: Database) -> None:
    recorder = UsageRecorder(database, usage_settings(usage_queue_size=100))
    # Not started: nothing drains the queue, as when the database is slow.
    for n in range(250):
        recorder.record(event(n))
    assert recorder.dropped == 150
    assert recorder.pending == 100

    recorder.start()
    await until(lambda: recorder.written == 100, what="the kept 100 written")
    await recorder.stop(5)
    # The newest survive: 150..249.
    assert sorted(await request_ids(database)) == sorted(f"req-{n}" for n in range(150, 250))
    assert recorder.recorded == recorder.written + recorder.dropped == 250


async def test_partial_batch_waits_for_the_interval_full_batch_goes_at_once(
    database: Database,
) -> None:
    recorder = UsageRecorder(
        database, usage_settings(usage_batch_size=100, usage_flush_interval=3600)
    )
    recorder.start()
    for n in range(250):
        recorder.record(event(n))
    # Two full batches go without waiting for the (hour-long) interval.
    await until(lambda: recorder.written == 200, what="two full batches")
    assert recorder.pending == 50
    assert await count_records(database) == 200
    await recorder.stop(5)


async def test_stop_flushes_what_is_queued(database: Database) -> None:
    recorder = UsageRecorder(
        database, usage_settings(usage_batch_size=1000, usage_flush_interval=3600)
    )
    recorder.start()
    for n in range(2500):
        recorder.record(event(n))
    started = time.monotonic()
    await recorder.stop(10)
    # The queued partial batch did not wait for the hour-long interval.
    assert time.monotonic() - started < 5
    assert await count_records(database) == 2500
    assert (await rollup_sums(database))["requests"] == 2500
    assert recorder.written == 2500
    assert recorder.dropped == 0
    assert recorder.pending == 0

    # After stop, nothing is queued for a writer that no longer runs: it is counted.
    recorder.record(event(9999))
    assert recorder.dropped == 1
    assert recorder.recorded == recorder.written + recorder.dropped


async def test_stop_counts_what_it_could_not_write_as_dropped() -> None:
    # Nothing listens on this port: every attempt fails at connect.
    database = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/test")
    try:
        recorder = UsageRecorder(database, usage_settings(), retry_max=0.05)
        recorder.start()
        for n in range(300):
            recorder.record(event(n))
        await until(lambda: recorder.write_errors >= 2, what="failed attempts")
        assert recorder.pending == 300  # kept, not lost
        await recorder.stop(0.5)
    finally:
        await database.dispose()
    assert recorder.written == 0
    assert recorder.dropped == 300
    assert recorder.pending == 0


async def test_two_writers_keep_the_rollups_exact(database: Database) -> None:
    """Two processes' recorders (own engines) adding to the same rollup rows."""
    other = Database(database.url, schema=database.schema)
    try:
        a = UsageRecorder(database, usage_settings(usage_batch_size=50))
        b = UsageRecorder(other, usage_settings(usage_batch_size=50))
        a.start()
        b.start()
        for n in range(3000):
            # Same hour, consumer, key and route: every batch hits the same row.
            (a if n % 2 else b).record(event(n, key_id=KEYS[0]))
        await until(lambda: a.written + b.written == 3000, what="both written")
        await a.stop(5)
        await b.stop(5)
    finally:
        await other.dispose()
    assert await count_records(database) == 3000
    async with database.sessions() as session:
        rows = (await session.execute(select(UsageHourly.requests))).scalars().all()
    assert rows == [3000]


async def test_values_a_column_cannot_hold_are_made_to_fit(database: Database) -> None:
    recorder = UsageRecorder(database, usage_settings())
    recorder.start()
    naive = datetime(2025, 3, 10, 12, 30)  # a naive timestamp is taken as UTC
    recorder.record(event(1, path="/api/" + "x" * 5000, ts=naive))
    recorder.record(event(2, path="/api/nul\x00byte/\ud800"))
    recorder.record(event(3, latency_ms=float("nan"), bytes_in=-5))
    recorder.record("not an event")  # type: ignore[arg-type]
    await until(lambda: recorder.written == 3, what="three written")
    await recorder.stop(5)

    assert recorder.dropped == 1  # the thing that was not an event
    async with database.sessions() as session:
        rows = {
            r.request_id: r
            for r in (await session.scalars(select(UsageRecord))).all()
        }
    assert len(rows["req-1"].path) == 2048
    assert rows["req-1"].ts == datetime(2025, 3, 10, 12, 30, tzinfo=UTC)
    assert rows["req-2"].path == "/api/nulbyte/?"
    assert rows["req-3"].latency_ms == 0.0
    assert rows["req-3"].bytes_in == 0


@pytest.mark.needs_postgres
async def test_a_refused_row_is_isolated_and_the_rest_written() -> None:
    from support.db import _pg_execute, pg_schema_database

    async with pg_schema_database() as database:
        # A trigger that refuses one path with a data exception (SQLSTATE class 22),
        # standing for any value the database will not store.
        await _pg_execute(f"""
            SET search_path TO "{database.schema}";
            CREATE FUNCTION refuse() RETURNS trigger AS $$
            BEGIN
              IF NEW.path = '/poison' THEN
                RAISE EXCEPTION 'refused' USING ERRCODE = '22023';
              END IF;
              RETURN NEW;
            END $$ LANGUAGE plpgsql;
            CREATE TRIGGER refuse BEFORE INSERT ON usage_records
              FOR EACH ROW EXECUTE FUNCTION refuse();
        """)
        recorder = UsageRecorder(database, usage_settings(usage_batch_size=100))
        for n in range(100):
            recorder.record(event(n, path="/poison" if n == 37 else "/api/ok"))
        recorder.start()
        await until(lambda: recorder.written == 99, what="99 written")
        await recorder.stop(5)
        assert recorder.dropped == 1
        assert await count_records(database) == 99
        assert (await rollup_sums(database))["requests"] == 99
        assert "req-37" not in await request_ids(database)


@pytest.mark.needs_postgres
async def test_a_retry_after_an_unseen_commit_writes_nothing_twice() -> None:
    """The commit landed but its answer was lost: the retry must find it written."""
    from support.db import pg_schema_database
    from tollway.usage.writer import Batch, event_row, write_batch

    async with pg_schema_database() as database:
        batch = Batch([event_row(event(n)) for n in range(10)])
        assert await write_batch(database, batch) is True
        batch.attempts = 1  # as if that attempt had timed out
        assert await write_batch(database, batch) is False
        assert await count_records(database) == 10
        assert (await rollup_sums(database))["requests"] == 10
        async with database.sessions() as session:
            ids = sorted((await session.scalars(select(UsageRecord.id))).all())
        assert ids == sorted(batch.ids or [])
        assert await _count_hourly_rows(database) == 1


async def _count_hourly_rows(database: Database) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(UsageHourly)) or 0)


async def test_a_queue_smaller_than_a_batch_is_written_when_full(database: Database) -> None:
    recorder = UsageRecorder(
        database,
        usage_settings(usage_queue_size=100, usage_batch_size=1000, usage_flush_interval=3600),
    )
    recorder.start()
    for n in range(100):
        recorder.record(event(n))
    # A full queue is a full batch: no waiting for the (hour-long) interval.
    await until(lambda: recorder.written == 100, what="the full queue written")
    await recorder.stop(5)
    assert recorder.dropped == 0
