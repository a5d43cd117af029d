"""Shared bits of the usage tests: events, settings, polling, counting rows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select

from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.storage.models import LATENCY_BUCKET_COLUMNS, UsageHourly, UsageRecord
from tollway.usage.events import UsageEvent

BASE_TS = datetime(2025, 3, 10, 12, 0, tzinfo=UTC)


def usage_settings(**values: Any) -> Settings:
    defaults: dict[str, Any] = {
        "usage_queue_size": 100_000,
        "usage_batch_size": 1000,
        "usage_flush_interval": 0.05,
    }
    defaults.update(values)
    return Settings(**defaults)


def event(
    n: int = 0,
    *,
    ts: datetime = BASE_TS,
    consumer_id: uuid.UUID | None = None,
    key_id: uuid.UUID | None = None,
    route: str | None = "api",
    status: int = 200,
    latency_ms: float = 12.5,
    path: str = "/api/things",
    bytes_in: int = 10,
    bytes_out: int = 100,
) -> UsageEvent:
    """One event; `n` goes into request_id so that tests can tell events apart."""
    return UsageEvent(
        ts=ts,
        consumer_id=consumer_id or uuid.UUID(int=1),
        key_id=key_id,
        route=route,
        method="GET",
        path=path,
        status=status,
        upstream_latency_ms=latency_ms / 2,
        latency_ms=latency_ms,
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        request_id=f"req-{n}",
        client_ip="127.0.0.1",
    )


async def until(
    predicate: Callable[[], bool], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll `predicate` until true or fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)  # polling a condition, with a deadline


async def count_records(database: Database) -> int:
    async with database.sessions() as session:
        return int(await session.scalar(select(func.count()).select_from(UsageRecord)) or 0)


async def request_ids(database: Database) -> list[str]:
    async with database.sessions() as session:
        return [r for r in (await session.scalars(select(UsageRecord.request_id))).all() if r]


async def rollup_sums(database: Database) -> dict[str, int]:
    """Sums over all of usage_hourly: requests, errors and each latency bucket."""
    columns = ["requests", "errors", *LATENCY_BUCKET_COLUMNS]
    async with database.sessions() as session:
        row = (
            await session.execute(
                select(*(func.sum(getattr(UsageHourly, c)) for c in columns))
            )
        ).one()
    return {c: int(v or 0) for c, v in zip(columns, row, strict=True)}
