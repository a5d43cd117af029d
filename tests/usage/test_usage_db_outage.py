"""A PostgreSQL that stops answering mid-run, reached through the fault relay.

The recorder keeps recording without slowing down, keeps its batches, and when the
database answers again the whole backlog lands: no loss, no duplicate.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from usage_helpers import count_records, event, request_ids, rollup_sums, until, usage_settings

from support.db import pg_schema_database
from support.relay import FaultRelay
from tollway.storage.database import Database
from tollway.usage.recorder import UsageRecorder

pytestmark = [pytest.mark.needs_postgres, pytest.mark.usefixtures("frozen_heap")]


def via(relay: FaultRelay, direct: Database) -> Database:
    """The test's database (its schema), reached through the relay."""
    assert direct.schema is not None
    return Database(
        f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/test", schema=direct.schema
    )


def blackhole(relay: FaultRelay) -> None:
    # Open connections and new ones: nothing is forwarded, nothing answers.
    relay.blackhole()


def host_gone(relay: FaultRelay) -> None:
    # The open connections are reset; new ones connect but nothing answers.
    relay.reset()
    relay.drop()


@pytest.mark.parametrize("outage", [blackhole, host_gone], ids=["blackhole", "reset-then-drop"])
async def test_database_stops_answering_nothing_is_lost(
    outage: Callable[[FaultRelay], None],
) -> None:
    async with pg_schema_database() as direct:
        async with FaultRelay("127.0.0.1", 5432) as relay:
            through = via(relay, direct)
            recorder = UsageRecorder(
                through,
                usage_settings(usage_batch_size=200, usage_queue_size=50_000),
                write_timeout=1.0,
                retry_max=0.3,
            )
            recorder.start()
            try:
                n = 0
                for _ in range(1000):
                    recorder.record(event(n))
                    n += 1
                await until(lambda: recorder.written == 1000, what="first 1000 written")

                outage(relay)
                # Recording goes on at full speed while writes stall and fail.
                started = time.perf_counter()
                for _ in range(4000):
                    recorder.record(event(n))
                    n += 1
                assert time.perf_counter() - started < 0.5
                await until(lambda: recorder.write_errors >= 2, what="writes failing")
                for _ in range(1000):
                    recorder.record(event(n))
                    n += 1
                assert recorder.written == 1000
                assert recorder.pending == 5000
                assert await count_records(direct) == 1000  # nothing slipped through

                relay.passthrough()
                await until(lambda: recorder.written == n, timeout=60, what="backlog written")
                await recorder.stop(5)
            finally:
                await recorder.stop(0)
                await through.dispose()

        assert recorder.dropped == 0
        assert await count_records(direct) == n == 6000
        ids = await request_ids(direct)
        assert len(ids) == len(set(ids)) == 6000  # nothing twice
        assert (await rollup_sums(direct))["requests"] == 6000


async def test_slow_database_is_absorbed_by_the_queue() -> None:
    """100 ms of network delay per round trip: records keep flowing, all land."""
    async with pg_schema_database() as direct:
        async with FaultRelay("127.0.0.1", 5432) as relay:
            through = via(relay, direct)
            recorder = UsageRecorder(
                through, usage_settings(usage_batch_size=500)
            )
            recorder.start()
            try:
                relay.delay(0.05)
                started = time.perf_counter()
                for n in range(3000):
                    recorder.record(event(n))
                assert time.perf_counter() - started < 0.5
                await until(lambda: recorder.written == 3000, timeout=60, what="all written")
                await recorder.stop(5)
            finally:
                await recorder.stop(0)
                await through.dispose()
        assert recorder.write_errors == 0
        assert await count_records(direct) == 3000


async def test_outages_at_any_moment_still_write_each_row_once() -> None:
    """The network fails mid-write again and again (sometimes between a COMMIT and
    its answer): every row lands exactly once, and the rollups agree with the rows."""
    async with pg_schema_database() as direct:
        async with FaultRelay("127.0.0.1", 5432) as relay:
            through = via(relay, direct)
            recorder = UsageRecorder(
                through,
                usage_settings(usage_batch_size=50, usage_flush_interval=0.01),
                write_timeout=0.5,
                retry_initial=0.01,
                retry_max=0.1,
            )
            recorder.start()
            n = 0

            async def produce(until_written: float) -> None:
                # Keep events coming so that writes are in flight at every moment.
                nonlocal n
                loop = asyncio.get_running_loop()
                end = loop.time() + until_written
                while loop.time() < end:
                    for _ in range(20):
                        recorder.record(event(n))
                        n += 1
                    await asyncio.sleep(0.005)  # the request rate, not a wait for a result

            try:
                for cycle in range(6):
                    await produce(0.3 + 0.07 * cycle)
                    (relay.blackhole if cycle % 2 else relay.reset)()
                    await produce(0.6)
                    relay.passthrough()
                await until(lambda: recorder.written == n, timeout=60, what="all written")
                await recorder.stop(5)
            finally:
                await recorder.stop(0)
                await through.dispose()

        assert recorder.write_errors > 0  # the faults did hit writes
        assert recorder.dropped == 0
        ids = await request_ids(direct)
        assert len(ids) == len(set(ids)) == n
        assert (await rollup_sums(direct))["requests"] == n


async def test_a_write_whose_answer_the_network_lost_does_not_block_the_next() -> None:
    """The write's COPY goes on, but its answer (and then the driver's cancel
    request) is lost to a dead network. The writer must drop that connection hard:
    left open, it stays in its transaction on the server, and every retry of the
    batch waits on it."""
    async with pg_schema_database() as direct:
        async with FaultRelay("127.0.0.1", 5432) as relay:
            through = via(relay, direct)
            recorder = UsageRecorder(
                through,
                usage_settings(usage_batch_size=50, usage_flush_interval=0.01),
                write_timeout=2.0,
                retry_initial=0.05,
                retry_max=0.2,
            )
            records = f'"{direct.schema}".usage_records'
            loop = asyncio.get_running_loop()

            async def server_says(watcher: Any, sql: str) -> Any:
                value = (await watcher.exec_driver_sql(sql)).scalar()
                await watcher.rollback()
                return value

            async with direct.engine.connect() as locker, direct.engine.connect() as watcher:
                # The records table locked: the write's COPY waits.
                await locker.begin()
                await locker.exec_driver_sql(f"LOCK TABLE {records} IN SHARE MODE")
                recorder.start()
                try:
                    for n in range(50):
                        recorder.record(event(n))
                    deadline = loop.time() + 30
                    while not (writer := await server_says(watcher, (
                        "SELECT pid FROM pg_locks"
                        f" WHERE relation = '{records}'::regclass AND NOT granted"
                    ))):
                        assert loop.time() < deadline, "the write never waited"
                        await asyncio.sleep(0.01)  # polling the server, with a deadline
                    # The network dies, then the lock goes: the server goes on with
                    # the write, answers into the void and waits for the client.
                    relay.blackhole()
                    await locker.rollback()
                    waits_for = f"SELECT wait_event_type FROM pg_stat_activity WHERE pid = {writer}"
                    while await server_says(watcher, waits_for) != "Client":
                        assert loop.time() < deadline, "the write never went on"
                        await asyncio.sleep(0.01)  # polling the server, with a deadline
                    await until(lambda: recorder.write_errors >= 1, what="the write timing out")
                    relay.passthrough()
                    await until(lambda: recorder.written == 50, timeout=20, what="all written")
                    await recorder.stop(5)
                finally:
                    await recorder.stop(0)
                    await through.dispose()

        assert recorder.dropped == 0
        ids = await request_ids(direct)
        assert sorted(ids) == sorted(f"req-{n}" for n in range(50))
        assert (await rollup_sums(direct))["requests"] == 50
