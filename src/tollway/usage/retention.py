"""Retention: raw usage rows are kept for `usage_retention_days`, rollups for longer.

Raw rows (usage_records) go after `settings.usage_retention_days` (default 30).
Hourly rollups (usage_hourly) are kept for ROLLUP_RETENTION_DAYS (400 days, a bit
over 13 months: a year-over-year comparison of last month still finds its month),
or for the raw retention if someone sets that longer: a rollup never goes before
the rows it sums.

Deletes run in chunks of a few thousand rows, each its own short transaction, so
that a purge of millions of rows never holds a long lock (nor, on SQLite, the
single writer lock for long: usage writes go in between chunks). Every worker may
run it; deleting what another already deleted costs one indexed probe.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select, tuple_

from tollway.storage.database import Database
from tollway.storage.models import UsageHourly, UsageRecord, utcnow

ROLLUP_RETENTION_DAYS = 400
PURGE_CHUNK = 5000


@dataclass(frozen=True, slots=True)
class PurgeResult:
    records: int
    hourly: int


async def _purge_records(database: Database, before: datetime, chunk: int) -> int:
    total = 0
    while True:
        # By id through the ts index: each chunk is one bounded index range.
        doomed = select(UsageRecord.id).where(UsageRecord.ts < before).limit(chunk)
        async with database.engine.begin() as conn:
            result = await conn.execute(
                delete(UsageRecord).where(UsageRecord.id.in_(doomed.scalar_subquery()))
            )
        deleted = int(result.rowcount or 0)
        total += deleted
        if deleted < chunk:
            return total
        await asyncio.sleep(0)  # let request-side work run between chunks


async def _purge_hourly(database: Database, before: datetime, chunk: int) -> int:
    pk = tuple_(
        UsageHourly.hour, UsageHourly.consumer_id, UsageHourly.key_id, UsageHourly.route
    )
    total = 0
    while True:
        doomed = (
            select(
                UsageHourly.hour, UsageHourly.consumer_id, UsageHourly.key_id, UsageHourly.route
            )
            .where(UsageHourly.hour < before)
            .limit(chunk)
        )
        async with database.engine.begin() as conn:
            result = await conn.execute(delete(UsageHourly).where(pk.in_(doomed)))
        deleted = int(result.rowcount or 0)
        total += deleted
        if deleted < chunk:
            return total
        await asyncio.sleep(0)


async def purge_usage(
    database: Database,
    *,
    retention_days: int,
    rollup_retention_days: int = ROLLUP_RETENTION_DAYS,
    now: datetime | None = None,
    chunk: int = PURGE_CHUNK,
) -> PurgeResult:
    """Delete raw rows older than `retention_days` and rollups older than the longer
    of `rollup_retention_days` and `retention_days`; returns how many of each."""
    now = now or utcnow()
    records = await _purge_records(database, now - timedelta(days=retention_days), chunk)
    rollup_days = max(rollup_retention_days, retention_days)
    # Whole hours only: an hour is purged once all of it is past the bound.
    rollup_before = (now - timedelta(days=rollup_days)).replace(
        minute=0, second=0, microsecond=0
    )
    hourly = await _purge_hourly(database, rollup_before, chunk)
    return PurgeResult(records=records, hourly=hourly)
