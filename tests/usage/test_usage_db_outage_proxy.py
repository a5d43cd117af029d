"""The database stops answering while a gateway serves keyed traffic.

Warm keys keep being served (the key cache needs no database), every response is a
200, and when the database answers again the whole usage backlog lands.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from test_usage_through_proxy import KEY_AUTH, PEPPER, burst, count_rows, create_key, get, ok
from usage_helpers import until

from support.db import pg_fresh_database_url
from support.gateway import api_config, running_gateway
from support.relay import FaultRelay
from support.upstream import RecordingUpstream
from tollway.storage.database import Database

pytestmark = pytest.mark.needs_postgres


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream(ok, store_bodies=False) as up:
        yield up


async def test_requests_keep_succeeding_and_the_backlog_lands(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with pg_fresh_database_url() as direct_url, FaultRelay("127.0.0.1", 5432) as relay:
        name = direct_url.rsplit("/", 1)[1]
        through = f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/{name}"
        async with running_gateway(
            tmp_path,
            api_config(upstream.url, KEY_AUTH),
            database_url=through,
            key_pepper=PEPPER,
            usage_flush_interval=0.1,
        ) as gw:
            assert gw.runtime is not None and gw.runtime.usage is not None
            recorder = gw.runtime.usage
            new = await create_key(gw.runtime.database, gw.runtime.pepper)
            # Warm the key cache, and see the first rows land.
            assert await burst(gw.port, [get(new.raw, n) for n in range(200)]) == {200: 200}
            await until(lambda: recorder.written == 200, what="first 200 written")

            relay.blackhole()
            during = await burst(gw.port, [get(new.raw, n) for n in range(200, 2200)])
            assert during == {200: 2000}  # the outage is invisible to callers
            await until(lambda: recorder.write_errors >= 1, timeout=30, what="writes failing")
            assert recorder.written == 200

            relay.passthrough()
            await until(lambda: recorder.written == 2200, timeout=60, what="backlog written")
            assert recorder.dropped == 0

        direct = Database(direct_url)
        try:
            assert await count_rows(direct, new.key.id) == 2200
        finally:
            await direct.dispose()
