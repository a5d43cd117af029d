"""A key's whole life through two real gateway processes sharing one database.

create -> 200 on both -> disable (admin API of gateway A) -> 403 key_disabled on
BOTH within 1 s -> enable -> 200 -> rotate with a short grace -> old and new both
200 -> after the grace the old secret 401 on both, the new one 200.

Run twice: on a shared SQLite file without Redis (B learns of changes by polling
the outbox), and on PostgreSQL with Redis (B hears them through pub/sub; its poll
is then only a slow safety net, so the 1 s bound is Redis's doing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.db import pg_fresh_database_url
from support.gateway import GatewayProcess, api_config
from support.upstream import RecordingUpstream

ADMIN_TOKEN = "lifecycle-admin-token-0123456789"
PEPPER = "lifecycle-pepper-0123456789abcdef"
REDIS_URL = "redis://127.0.0.1:6379/0"
# The bound: a disabled key is refused everywhere within this.
REFUSAL_BOUND = 1.0


async def redis_available() -> bool:
    from redis.asyncio import Redis

    client: Redis = Redis.from_url(REDIS_URL)
    try:
        async with asyncio.timeout(2):
            await client.ping()
        return True
    except Exception:
        return False
    finally:
        await client.aclose()


class Node:
    """One gateway process, reached over real HTTP."""

    def __init__(self, name: str, proc: GatewayProcess, client: httpx.AsyncClient) -> None:
        self.name = name
        self.proc = proc
        self.client = client

    async def call(self, raw_key: str) -> tuple[int, str | None]:
        resp = await self.client.get(
            f"http://127.0.0.1:{self.proc.port}/api/ping", headers={"X-API-Key": raw_key}
        )
        if resp.status_code == 200:
            return 200, None
        return resp.status_code, resp.json()["error"]["code"]

    async def admin(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        resp = await self.client.request(
            method,
            f"http://127.0.0.1:{self.proc.admin_port}{path}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            **kw,
        )
        assert resp.status_code in (200, 201), resp.text
        body: dict[str, Any] = resp.json()
        return body


async def until(
    nodes: list[Node], raw_key: str, want: tuple[int, str | None], timeout: float
) -> dict[str, float]:
    """Poll every node until each answers `want`; seconds each one took."""
    start = time.monotonic()
    took: dict[str, float] = {}
    last: dict[str, tuple[int, str | None]] = {}
    try:
        async with asyncio.timeout(timeout):
            while len(took) < len(nodes):
                for node in nodes:
                    if node.name in took:
                        continue
                    last[node.name] = got = await node.call(raw_key)
                    if got == want:
                        took[node.name] = time.monotonic() - start
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"not every node answered {want} within {timeout} s: {last}")
    return took


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream() as up:
        yield up


async def run_lifecycle(
    tmp_path: Path, upstream: RecordingUpstream, env: dict[str, str]
) -> dict[str, Any]:
    config = tmp_path / "tollway.yaml"
    config.write_text(api_config(upstream.url, "plugins:\n  - name: key-auth\n"))
    common = {
        "TOLLWAY_ADMIN_TOKEN": ADMIN_TOKEN,
        "TOLLWAY_KEY_PEPPER": PEPPER,
        **env,
    }
    measured: dict[str, Any] = {}
    # Started one after the other: the first one migrates the shared database.
    procs: list[GatewayProcess] = []
    try:
        for name in ("a", "b"):
            proc = GatewayProcess(config, env=common, data_dir=tmp_path / f"data-{name}")
            procs.append(proc)
            await asyncio.to_thread(proc.start)
        async with httpx.AsyncClient(timeout=10) as client:
            a, b = Node("a", procs[0], client), Node("b", procs[1], client)
            both = [a, b]

            user = await a.admin("POST", "/users", json={"email": "life@example.com"})
            created = await a.admin("POST", "/keys", json={"user_id": user["id"], "name": "life"})
            key_id, raw = created["id"], created["key"]
            for node in both:
                assert await node.call(raw) == (200, None)

            await a.admin("PATCH", f"/keys/{key_id}", json={"status": "disabled"})
            took = await until(both, raw, (403, "key_disabled"), timeout=5)
            measured["disable"] = took
            assert max(took.values()) < REFUSAL_BOUND, took

            await a.admin("PATCH", f"/keys/{key_id}", json={"status": "active"})
            measured["enable"] = await until(both, raw, (200, None), timeout=5)
            assert max(measured["enable"].values()) < REFUSAL_BOUND

            rotated = await a.admin(
                "POST", f"/keys/{key_id}/rotate", json={"grace_seconds": 2}
            )
            new_raw = rotated["key"]
            grace_end = datetime.fromisoformat(rotated["previous_expires_at"]).timestamp()
            for node in both:
                assert await node.call(raw) == (200, None), node.name
                assert await node.call(new_raw) == (200, None), node.name
            # Those checks must have happened inside the grace, or they prove nothing.
            assert time.time() < grace_end, "the machine was too slow for a 2 s grace"

            # Nobody acts: the old secret stops at the end of the grace on its own.
            took = await until(both, raw, (401, "invalid_api_key"), timeout=10)
            late = time.time() - grace_end
            measured["old_secret_refused_after_grace"] = late
            assert late < REFUSAL_BOUND, late
            for node in both:
                assert await node.call(new_raw) == (200, None), node.name
                assert await node.call(raw) == (401, "invalid_api_key"), node.name
    except BaseException:
        for proc in procs:
            print(f"--- gateway {proc.port} log ---\n{proc.stderr()}")
        raise
    finally:
        for proc in procs:
            await asyncio.to_thread(proc.__exit__, None, None, None)
    print(f"lifecycle timings: {measured}")
    return measured


async def test_key_lifecycle_two_gateways_shared_sqlite(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    url = f"sqlite+aiosqlite:///{(tmp_path / 'shared.db').resolve()}"
    await run_lifecycle(tmp_path, upstream, {"TOLLWAY_DATABASE_URL": url})


@pytest.mark.needs_postgres
@pytest.mark.needs_redis
async def test_key_lifecycle_two_gateways_postgres_and_redis(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    if not await redis_available():
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    async with pg_fresh_database_url() as url:
        await run_lifecycle(
            tmp_path, upstream, {"TOLLWAY_DATABASE_URL": url, "TOLLWAY_REDIS_URL": REDIS_URL}
        )

