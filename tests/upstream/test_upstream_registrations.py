"""Self-registration: the store (register, refresh, heartbeat, deregister, expiry) and
the watcher that reports each service's live targets, on SQLite and PostgreSQL.

Expiry is driven by a clock the test moves, never by sleeping.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, text
from structlog.testing import capture_logs

from support.db import sqlite_database
from tollway.storage.database import Database
from tollway.upstream.registrations import (
    Registration,
    RegistrationStore,
    RegistrationWatcher,
    canonical_target,
)
from tollway.upstream.service import Target


class UtcClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class Changes:
    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Target, ...]]] = []

    def __call__(self, service: str, targets: tuple[Target, ...]) -> None:
        self.calls.append((service, targets))

    def take(self) -> list[tuple[str, tuple[Target, ...]]]:
        calls, self.calls = self.calls, []
        return calls


@pytest.fixture
def clock() -> UtcClock:
    return UtcClock()


@pytest.fixture
def store(database: Database, clock: UtcClock) -> RegistrationStore:
    return RegistrationStore(database, clock=clock)


# -- the store ---------------------------------------------------------------------


async def test_register_then_refresh(store: RegistrationStore, clock: UtcClock) -> None:
    reg, created = await store.register("api", "127.0.0.1:9001", ttl=30)
    assert created is True
    assert reg == Registration(
        service="api",
        target="127.0.0.1:9001",
        weight=100,
        tags=(),
        expires_at=clock.now + timedelta(seconds=30),
        registered_at=clock.now,
        ttl_seconds=30.0,
    )
    first = clock.now
    clock.advance(10)
    again, created = await store.register("api", "127.0.0.1:9001", ttl=5, weight=20,
                                          tags=("gpu", "eu"))
    assert created is False
    assert again.registered_at == first
    assert again.expires_at == clock.now + timedelta(seconds=5)
    assert (again.weight, again.tags, again.ttl_seconds) == (20, ("gpu", "eu"), 5.0)
    assert await store.live() == [again]
    assert again.to_target() == Target("127.0.0.1", 9001, 20)


async def test_one_spelling_per_address(store: RegistrationStore) -> None:
    await store.register("api", "Worker-1.Internal:80", ttl=30)
    _, created = await store.register("api", "worker-1.internal:80", ttl=30)
    assert created is False
    reg, _ = await store.register("api", "[::0:1]:8080", ttl=30)
    assert reg.target == "[::1]:8080"
    assert reg.to_target().authority == b"[::1]:8080"
    assert [r.target for r in await store.live("api")] == ["[::1]:8080", "worker-1.internal:80"]
    assert canonical_target(" [2001:DB8::1]:1 ") == "[2001:db8::1]:1"


@pytest.mark.parametrize(
    "target", ["127.0.0.1", "host:0", "host:65536", "::1:80", "[nope]:80", "a b:1", ""]
)
async def test_bad_targets_are_refused(store: RegistrationStore, target: str) -> None:
    with pytest.raises(ValueError):
        await store.register("api", target, ttl=30)
    assert await store.live() == []


async def test_bad_ttl_weight_and_tags_are_refused(store: RegistrationStore) -> None:
    for kwargs in ({"ttl": 0}, {"ttl": -1}, {"ttl": float("nan")}, {"ttl": 30, "weight": -1},
                   {"ttl": 30, "weight": 70000}, {"ttl": 30, "tags": ("",)}):
        with pytest.raises(ValueError):
            await store.register("api", "h:1", **kwargs)
    assert await store.live() == []


async def test_heartbeat_extends_by_the_registrations_own_ttl(
    store: RegistrationStore, clock: UtcClock
) -> None:
    await store.register("api", "h:1", ttl=10)
    clock.advance(8)
    beat = await store.heartbeat("api", "h:1")
    assert beat is not None
    assert beat.expires_at == clock.now + timedelta(seconds=10)
    clock.advance(8)  # 16 s after registering: alive thanks to the heartbeat
    assert [r.target for r in await store.live()] == ["h:1"]
    beat = await store.heartbeat("api", "H:1", ttl=60)
    assert beat is not None
    assert (beat.ttl_seconds, beat.expires_at) == (60.0, clock.now + timedelta(seconds=60))
    # The new ttl is kept for the heartbeats after.
    clock.advance(50)
    beat = await store.heartbeat("api", "h:1")
    assert beat is not None and beat.expires_at == clock.now + timedelta(seconds=60)


async def test_heartbeat_of_unknown_or_expired_is_none(
    store: RegistrationStore, clock: UtcClock
) -> None:
    assert await store.heartbeat("api", "h:1") is None
    await store.register("api", "h:1", ttl=1)
    assert await store.heartbeat("other", "h:1") is None
    clock.advance(1)  # expires_at == now: gone
    assert await store.heartbeat("api", "h:1") is None
    assert await store.live() == []


async def test_a_registration_expires_after_its_ttl(
    store: RegistrationStore, clock: UtcClock
) -> None:
    reg, _ = await store.register("api", "h:1", ttl=1)
    clock.advance(0.999)
    assert await store.live() == [reg]
    clock.advance(0.001)
    assert await store.live() == []
    # Registering again is a new registration.
    clock.advance(5)
    again, created = await store.register("api", "h:1", ttl=1)
    assert created is True
    assert again.registered_at == clock.now


async def test_deregister(store: RegistrationStore, clock: UtcClock) -> None:
    await store.register("api", "h:1", ttl=30)
    await store.register("api", "h:2", ttl=30)
    assert await store.deregister("api", "h:1") is True
    assert await store.deregister("api", "h:1") is False
    assert await store.deregister("other", "h:2") is False
    assert [r.target for r in await store.live()] == ["h:2"]
    clock.advance(30)
    assert await store.deregister("api", "h:2") is False  # already expired


async def test_live_filters_by_service_and_purge_removes_the_expired(
    store: RegistrationStore, database: Database, clock: UtcClock
) -> None:
    await store.register("b", "h:2", ttl=10)
    await store.register("a", "h:9", ttl=100)
    await store.register("a", "h:1", ttl=10)
    assert [(r.service, r.target) for r in await store.live()] == [
        ("a", "h:1"), ("a", "h:9"), ("b", "h:2")
    ]
    assert [r.target for r in await store.live("a")] == ["h:1", "h:9"]
    clock.advance(10)
    assert await store.purge_expired() == 2
    assert await store.purge_expired() == 0
    async with database.engine.connect() as conn:
        assert await conn.scalar(text("SELECT count(*) FROM upstream_targets")) == 1


async def test_concurrent_registrations_of_one_target_create_it_once(
    store: RegistrationStore,
) -> None:
    results = await asyncio.gather(
        *(store.register("api", "h:1", ttl=30, weight=w) for w in range(1, 6))
    )
    assert sum(created for _, created in results) == 1
    live = await store.live()
    assert len(live) == 1


# -- the watcher -------------------------------------------------------------------


async def test_the_watcher_reports_adds_removals_and_expiry(
    store: RegistrationStore, clock: UtcClock
) -> None:
    changes = Changes()
    watcher = RegistrationWatcher(store, changes, interval=0.05)
    await watcher.poll_once()
    assert changes.take() == []  # nothing registered, nothing changed

    await store.register("api", "h:2", ttl=5, weight=50)
    await store.register("api", "h:1", ttl=30)
    await store.register("img", "g:1", ttl=30)
    await watcher.poll_once()
    assert changes.take() == [
        ("api", (Target("h", 1, 100), Target("h", 2, 50))),
        ("img", (Target("g", 1, 100),)),
    ]
    await watcher.poll_once()
    assert changes.take() == []  # same sets: no calls

    await store.register("api", "h:1", ttl=30, weight=10)  # a weight change is a change
    await watcher.poll_once()
    assert changes.take() == [("api", (Target("h", 1, 10), Target("h", 2, 50)))]

    clock.advance(5)  # h:2 stops heart-beating and expires
    await watcher.poll_once()
    assert changes.take() == [("api", (Target("h", 1, 10),))]

    await store.deregister("img", "g:1")
    await watcher.poll_once()
    assert changes.take() == [("img", ())]

    clock.advance(30)  # the last one of api expires: reported as empty
    await watcher.poll_once()
    assert changes.take() == [("api", ())]
    assert watcher.current == {}


async def test_on_sqlite_the_watcher_reads_only_after_a_commit_or_an_expiry(
    tmp_path: Path, clock: UtcClock
) -> None:
    async with sqlite_database(tmp_path) as database:
        store = RegistrationStore(database, clock=clock)
        statements: list[str] = []

        def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        event.listen(database.engine.sync_engine, "before_cursor_execute", seen)
        changes = Changes()
        watcher = RegistrationWatcher(store, changes)
        await store.register("api", "h:1", ttl=5)
        await watcher.poll_once()
        assert changes.take() == [("api", (Target("h", 1),))]
        before = len(statements)
        for _ in range(10):
            await watcher.poll_once()
        assert (len(statements), watcher.skipped_polls) == (before, 10)

        await store.register("api", "h:2", ttl=30)  # a commit: read
        await watcher.poll_once()
        assert changes.take() == [("api", (Target("h", 1), Target("h", 2)))]

        clock.advance(5)  # nobody writes, h:1 expires: read all the same
        await watcher.poll_once()
        assert changes.take() == [("api", (Target("h", 2),))]
        await watcher.aclose()


async def test_the_watcher_survives_a_database_outage(
    store: RegistrationStore, database: Database
) -> None:
    changes = Changes()
    watcher = RegistrationWatcher(store, changes)
    await store.register("api", "h:1", ttl=30)
    await watcher.poll_once()
    assert len(changes.take()) == 1

    async with database.engine.begin() as conn:
        await conn.execute(text("ALTER TABLE upstream_targets RENAME TO upstream_targets_away"))
    with capture_logs() as logs:
        await watcher.poll_once()
        await watcher.poll_once()
        assert changes.take() == []  # the last known targets are kept
        assert watcher.current == {"api": (Target("h", 1),)}
        async with database.engine.begin() as conn:
            await conn.execute(
                text("ALTER TABLE upstream_targets_away RENAME TO upstream_targets")
            )
        await store.register("api", "h:2", ttl=30)
        await watcher.poll_once()
    assert changes.take() == [("api", (Target("h", 1), Target("h", 2)))]
    events = [e["event"] for e in logs if e["event"].startswith("registrations_poll")]
    assert events == ["registrations_poll_failed", "registrations_poll_recovered"]


async def test_the_running_watcher_reports_within_its_interval(
    store: RegistrationStore,
) -> None:
    seen = asyncio.Event()
    calls: list[tuple[str, tuple[Target, ...]]] = []

    def on_change(service: str, targets: tuple[Target, ...]) -> None:
        calls.append((service, targets))
        seen.set()

    watcher = RegistrationWatcher(store, on_change, interval=0.05)
    watcher.start()
    try:
        await store.register("api", "h:1", ttl=30)
        async with asyncio.timeout(5):
            await seen.wait()
    finally:
        await watcher.aclose()
    assert calls == [("api", (Target("h", 1),))]


async def test_a_failing_callback_does_not_stop_the_watcher(store: RegistrationStore) -> None:
    calls: list[str] = []

    def on_change(service: str, targets: tuple[Target, ...]) -> None:
        calls.append(service)
        if service == "a":
            raise RuntimeError("consumer bug")

    watcher = RegistrationWatcher(store, on_change)
    await store.register("a", "h:1", ttl=30)
    await store.register("b", "h:1", ttl=30)
    with capture_logs():
        await watcher.poll_once()
    assert calls == ["a", "b"]
