"""Usage records through a real gateway with key-auth: bursts, and SIGTERM.

Every request that key-auth identified is one usage row; none is lost, and a
SIGTERM writes what is still queued before the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httptools
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select
from usage_helpers import rollup_sums, until

from support.db import pg_fresh_database_url
from support.gateway import GatewayProcess, api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply
from tollway.identity import consumers, keys
from tollway.storage.database import Database, default_url
from tollway.storage.migrate import upgrade
from tollway.storage.models import UsageRecord

PEPPER = "usage-test-pepper"
KEY_AUTH = "plugins:\n  - name: key-auth\n"


async def ok(req: Received, reply: Reply) -> None:
    await req.complete.wait()
    reply.send(200, [("content-type", "text/plain")], b"ok")


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream(ok, store_bodies=False) as up:
        yield up


@contextlib.asynccontextmanager
async def database_url(backend: str, data_dir: Path) -> AsyncIterator[str]:
    if backend == "postgres":
        async with pg_fresh_database_url() as url:
            yield url
    else:
        yield default_url(data_dir)


BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.needs_postgres),
]


async def create_key(database: Database, pepper: bytes) -> keys.NewKey:
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="burst@example.com")
        new = await keys.create_key(session, pepper, consumer_id=consumer.id, name="burst")
        await session.commit()
    return new


class _Responses:
    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.parser = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.statuses.append(self.parser.get_status_code())


async def keepalive_client(port: int, requests: list[bytes]) -> list[int]:
    """Send the requests one after another on one keep-alive connection."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    got = _Responses()
    try:
        for request in requests:
            expected = len(got.statuses) + 1
            writer.write(request)
            while len(got.statuses) < expected:
                data = await reader.read(65536)
                if not data:
                    raise ConnectionError("gateway closed the connection")
                got.parser.feed_data(data)
    finally:
        writer.close()
    return got.statuses


async def burst(port: int, requests: list[bytes], connections: int = 32) -> Counter[int]:
    shares = [requests[i::connections] for i in range(connections)]
    results = await asyncio.gather(*(keepalive_client(port, s) for s in shares if s))
    return Counter(status for statuses in results for status in statuses)


def get(raw_key: str | None, n: int) -> bytes:
    key = f"X-API-Key: {raw_key}\r\n" if raw_key else ""
    return f"GET /api/item/{n}?page=2 HTTP/1.1\r\nHost: t\r\n{key}\r\n".encode()


async def count_rows(database: Database, key_id: uuid.UUID | None = None) -> int:
    stmt = select(func.count()).select_from(UsageRecord)
    if key_id is not None:
        stmt = stmt.where(UsageRecord.key_id == key_id)
    async with database.sessions() as session:
        return int(await session.scalar(stmt) or 0)


def usage_metric(body: bytes, name: str) -> float:
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    return 0.0


@pytest.mark.parametrize("backend", BACKENDS)
async def test_burst_of_10000_requests_is_10000_usage_rows(
    backend: str, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with database_url(backend, tmp_path / "data") as url, running_gateway(
        tmp_path, api_config(upstream.url, KEY_AUTH), database_url=url, key_pepper=PEPPER
    ) as gw:
        assert gw.runtime is not None and gw.runtime.usage is not None
        recorder = gw.runtime.usage
        before, _ = gw.metrics.render()
        new = await create_key(gw.runtime.database, gw.runtime.pepper)

        requests = [get(new.raw, n) for n in range(10_000)]
        # Not identified: refused by key-auth, and not usage of anyone.
        requests += [get(None, n) for n in range(100)]
        statuses = await burst(gw.port, requests)
        assert statuses == {200: 10_000, 401: 100}

        await until(lambda: recorder.written == 10_000, timeout=60, what="10,000 written")
        assert recorder.dropped == 0
        assert recorder.pending == 0
        database = gw.runtime.database
        assert await count_rows(database) == 10_000
        assert await count_rows(database, new.key.id) == 10_000
        assert (await rollup_sums(database))["requests"] == 10_000
        async with database.sessions() as session:
            paths = (await session.scalars(select(UsageRecord.path).distinct())).all()
            statuses_logged = (await session.scalars(select(UsageRecord.status).distinct())).all()
        assert len(paths) == 10_000  # one row per request, without the query string
        assert all("?" not in p for p in paths)
        assert statuses_logged == [200]

        after, _ = gw.metrics.render()
        written = "tollway_usage_records_written_total"
        assert usage_metric(after, written) - usage_metric(before, written) == 10_000
        assert usage_metric(after, "tollway_usage_queue_depth") == 0


@pytest.mark.parametrize(
    ("backend", "workers"),
    [
        pytest.param("sqlite", 1, id="sqlite-1-worker"),
        pytest.param("postgres", 2, id="postgres-2-workers", marks=pytest.mark.needs_postgres),
    ],
)
async def test_sigterm_writes_the_queue_before_exit(
    backend: str, workers: int, tmp_path: Path, upstream: RecordingUpstream
) -> None:
    data_dir = tmp_path / "data"
    config = tmp_path / "tollway.yaml"
    config.write_text(api_config(upstream.url, KEY_AUTH))
    async with database_url(backend, data_dir) as url:
        database = Database(url)
        try:
            await upgrade(database)
            new = await create_key(database, PEPPER.encode())
            env = {
                "TOLLWAY_DATABASE_URL": url,
                "TOLLWAY_KEY_PEPPER": PEPPER,
                # Nothing is written while the gateway runs: neither a full batch
                # nor the interval comes; only the shutdown can write these rows.
                "TOLLWAY_USAGE_BATCH_SIZE": "100000",
                "TOLLWAY_USAGE_FLUSH_INTERVAL": "3600",
            }
            proc = GatewayProcess(config, env=env, workers=workers, data_dir=data_dir)
            with proc:
                statuses = await burst(proc.port, [get(new.raw, n) for n in range(3000)])
                assert statuses == {200: 3000}
                assert await count_rows(database) == 0  # all of it still queued
                proc.terminate()
                code = await asyncio.to_thread(proc.wait, 60)
                assert code == 0, proc.stderr()
            assert await count_rows(database) == 3000
            assert await count_rows(database, new.key.id) == 3000
            assert (await rollup_sums(database))["requests"] == 3000
        finally:
            await database.dispose()
