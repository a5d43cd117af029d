"""Retention: raw rows after usage_retention_days, rollups after ~13 months, in chunks."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select
from usage_helpers import count_records, event, until, usage_settings

from tollway.storage.database import Database
from tollway.storage.models import UsageHourly, UsageRecord
from tollway.usage.recorder import UsageRecorder
from tollway.usage.retention import ROLLUP_RETENTION_DAYS, purge_usage
from tollway.usage.writer import Batch, event_row, write_batch

NOW = datetime(2025, 6, 1, 12, 30, tzinfo=UTC)


async def write(database: Database, ages_days: list[float], now: datetime = NOW) -> None:
    events = [event(i, ts=now - timedelta(days=age)) for i, age in enumerate(ages_days)]
    await write_batch(database, Batch([event_row(e) for e in events]))


async def hours(database: Database) -> list[datetime]:
    async with database.sessions() as session:
        return sorted((await session.scalars(select(UsageHourly.hour))).all())


async def test_purge_keeps_recent_raw_rows_and_longer_rollups(database: Database) -> None:
    # 23 rows 40 days old, 2 rows 10 days old, and rollups from 500 days ago.
    await write(database, [40.0] * 23 + [10.0, 10.0] + [500.0])
    assert len(await hours(database)) == 3

    # A chunk of 5 makes the purge loop over several short transactions.
    result = await purge_usage(database, retention_days=30, now=NOW, chunk=5)
    assert result.records == 24  # 23 + the 500-day-old one
    assert result.hourly == 1  # only the 500-day-old hour is past 400 days
    assert await count_records(database) == 2
    async with database.sessions() as session:
        left = (await session.scalars(select(UsageRecord.ts))).all()
    assert all(NOW - ts < timedelta(days=30) for ts in left)
    # The 40-day-old hour's rollup outlives its raw rows: statistics still see it.
    assert [NOW - h > timedelta(days=30) for h in await hours(database)] == [True, False]

    again = await purge_usage(database, retention_days=30, now=NOW, chunk=5)
    assert (again.records, again.hourly) == (0, 0)


async def test_rollups_go_only_in_whole_hours(database: Database) -> None:
    bound = NOW - timedelta(days=ROLLUP_RETENTION_DAYS)
    # An event in the hour holding the bound: that hour is not fully past it.
    await write_batch(database, Batch([event_row(event(1, ts=bound + timedelta(minutes=-1)))]))
    await write_batch(database, Batch([event_row(event(2, ts=bound - timedelta(hours=2)))]))
    result = await purge_usage(database, retention_days=30, now=NOW)
    assert result.hourly == 1
    assert len(await hours(database)) == 1


async def test_recorder_purges_shortly_after_start(database: Database) -> None:
    now = datetime.now(UTC)
    await write_batch(database, Batch([
        event_row(event(1, ts=now - timedelta(days=31))),
        event_row(event(2, ts=now - timedelta(days=1))),
    ]))
    recorder = UsageRecorder(
        database, usage_settings(usage_retention_days=30), purge_first_delay=0.0
    )
    recorder.start()
    try:
        await until(lambda: recorder.purged_records == 1, what="the purge")
    finally:
        await recorder.stop(5)
    assert await count_records(database) == 1
