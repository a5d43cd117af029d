"""Plans, windows and grants as records, and the PlanBook with a fake loader.

No database here: tests/limits/test_plans_db.py runs the PlanBook against SQLite
and PostgreSQL, and the change feed that keeps it current.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest

from tollway.limits.plans import (
    Grant,
    Plan,
    PlanBook,
    PlanError,
    WindowSpec,
    check_limits,
    grant_extras,
)

NOW = 1_800_000_000.0


# ---- records and validation ------------------------------------------------------------


def test_window_spec_accepts_valid_windows() -> None:
    assert WindowSpec("second", 10, burst=20).burst == 20
    assert WindowSpec("day", 1000, cost=5).cost == 5
    assert WindowSpec("month", 1).to_dict() == {"per": "month", "limit": 1}
    assert WindowSpec("minute", 5, 7, 2).to_dict() == {
        "per": "minute",
        "limit": 5,
        "burst": 7,
        "cost": 2,
    }
    assert WindowSpec.from_dict({"per": "hour", "limit": 3, "burst": 4}) == WindowSpec(
        "hour", 3, burst=4
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"per": "week", "limit": 1}, "per"),
        ({"per": "second", "limit": 0}, "limit"),
        ({"per": "second", "limit": True}, "limit"),
        ({"per": "second", "limit": 1.5}, "limit"),
        ({"per": "second", "limit": 2**31}, "limit"),
        ({"per": "second", "limit": 1, "burst": 0}, "burst"),
        ({"per": "day", "limit": 1, "burst": 2}, "burst"),
        ({"per": "month", "limit": 1, "burst": 2}, "burst"),
        ({"per": "minute", "limit": 1, "cost": 0}, "cost"),
    ],
)
def test_window_spec_refuses_invalid_windows(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(PlanError) as info:
        WindowSpec(**kwargs)
    assert info.value.field == field
    # From JSON, the error names the window's place in the plan.
    with pytest.raises(PlanError) as info:
        first = {"per": "day" if kwargs["per"] == "second" else "second", "limit": 1}
        check_limits([first, kwargs])
    assert info.value.field == f"limits[1].{field}"


def test_limits_one_window_per_per_in_canonical_order() -> None:
    limits = check_limits([{"per": "day", "limit": 100}, WindowSpec("second", 2)])
    assert [w.per for w in limits] == ["second", "day"]
    with pytest.raises(PlanError) as info:
        check_limits([{"per": "day", "limit": 1}, {"per": "day", "limit": 2}])
    assert info.value.field == "limits[1].per"
    with pytest.raises(PlanError) as info:
        check_limits([{"per": "day", "limit": 1, "brust": 2}])
    assert info.value.field == "limits[0].brust"
    for junk in ("abc", {"per": "day"}, [1]):
        with pytest.raises(PlanError):
            check_limits(junk)  # type: ignore[arg-type]


def test_plan_validates_name_limits_and_description() -> None:
    plan = Plan("pro", (WindowSpec("day", 10), WindowSpec("second", 1)), "Pro")
    assert [w.per for w in plan.limits] == ["second", "day"]
    assert plan.window("day") == WindowSpec("day", 10)
    assert plan.window("hour") is None
    assert Plan("free", ()).limits == ()
    for bad in ("", "has space", "-dash", "x" * 65, "a/b", "é"):
        with pytest.raises(PlanError) as info:
            Plan(bad, ())
        assert info.value.field == "name"
    with pytest.raises(PlanError) as info:
        Plan("p", (WindowSpec("day", 1), WindowSpec("day", 2)))
    assert info.value.field == "limits[1].per"
    with pytest.raises(PlanError) as info:
        Plan("p", (), "x" * 1001)
    assert info.value.field == "description"


def test_grant_validation_and_extras() -> None:
    g1 = Grant("g1", "c", "minute", 10, NOW + 60, "launch")
    g2 = Grant("g2", "c", "minute", 5, NOW + 120)
    g3 = Grant("g3", "c", "day", 100, NOW + 120)
    assert g1.active(NOW) and not g1.active(NOW + 60)
    assert grant_extras([g1, g2, g3]) == {"minute": 15, "day": 100}
    assert grant_extras([]) == {}
    for kwargs, field in (
        ({"per": "week"}, "per"),
        ({"extra": 0}, "extra"),
        ({"extra": -3}, "extra"),
        ({"expires_at": float("inf")}, "expires_at"),
        ({"expires_at": float("nan")}, "expires_at"),
        ({"reason": "x" * 201}, "reason"),
    ):
        values: dict[str, Any] = {
            "id": "g",
            "consumer_id": "c",
            "per": "minute",
            "extra": 1,
            "expires_at": NOW,
        }
        values.update(kwargs)
        with pytest.raises(PlanError) as info:
            Grant(**values)
        assert info.value.field == field, kwargs


# ---- the PlanBook ----------------------------------------------------------------------


class FakeStore:
    """What a loader reads; counts loads and can be made to fail or to stall."""

    def __init__(self) -> None:
        self.plans: list[Plan] = []
        self.grants: list[Grant] = []
        self.loads = 0
        self.fail = False
        self.gate: asyncio.Event | None = None

    async def load(self) -> tuple[Sequence[Plan], Sequence[Grant]]:
        self.loads += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ConnectionError("database down")
        return list(self.plans), list(self.grants)


async def eventually(predicate: Any, timeout: float = 2.0) -> float:
    """Seconds until predicate() holds (polled; fails after `timeout`)."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.002)
    return time.monotonic() - start


async def test_book_answers_plans_and_active_grants_by_fake_clock() -> None:
    store = FakeStore()
    store.plans = [Plan("pro", (WindowSpec("second", 5, burst=10),))]
    store.grants = [
        Grant("late", "c1", "second", 3, NOW + 100),
        Grant("soon", "c1", "day", 50, NOW + 10),
        Grant("other", "c2", "second", 1, NOW + 5),
    ]
    book = PlanBook(store.load)
    await book.start()
    try:
        assert book.plan("pro") == store.plans[0]
        assert book.plan("nope") is None
        assert book.plan(None) is None
        assert [g.id for g in book.grants("c1", NOW)] == ["soon", "late"]
        assert [g.id for g in book.grants("c1", NOW + 10)] == ["late"]
        assert [g.id for g in book.grants("c1", NOW + 99.999)] == ["late"]
        assert book.grants("c1", NOW + 100) == ()
        assert book.grants("c2", NOW) != () and book.grants("c2", NOW + 5) == ()
        assert book.grants("nobody", NOW) == ()
        assert book.generation == 1
    finally:
        await book.stop()


async def test_book_reloads_on_plan_and_grant_notices_and_resets_only() -> None:
    store = FakeStore()
    book = PlanBook(store.load, refresh_interval=3600)
    await book.start()
    try:
        store.plans = [Plan("new", ())]
        book.on_change("key", "x")
        book.on_change("consumer", "y")
        # Not a kind the book follows: no reload (checked after a followed one lands).
        book.on_change("plan", "new")
        await eventually(lambda: book.plan("new") is not None)
        assert book.notices == 1
        assert store.loads == 2

        store.grants = [Grant("g", "c", "hour", 2, time.time() + 60)]
        book.on_change("grant", "c")
        await eventually(lambda: book.grants("c", time.time()) != ())

        store.plans = []
        book.on_reset()
        await eventually(lambda: book.plan("new") is None)
        assert book.generation == 4
    finally:
        await book.stop()


async def test_book_notice_during_a_load_loads_again() -> None:
    store = FakeStore()
    book = PlanBook(store.load, refresh_interval=3600)
    await book.start()
    try:
        store.gate = asyncio.Event()
        book.on_change("plan", "a")
        await eventually(lambda: store.loads == 2)  # stalled in the loader
        store.plans = [Plan("a", ())]  # committed after that load read
        book.on_change("plan", "a")
        store.gate.set()
        await eventually(lambda: book.plan("a") is not None)
        assert store.loads == 3
    finally:
        await book.stop()


async def test_book_keeps_what_it_has_when_a_reload_fails_and_retries() -> None:
    store = FakeStore()
    store.plans = [Plan("pro", ())]
    book = PlanBook(store.load, refresh_interval=3600, retry_interval=0.02)
    await book.start()
    try:
        store.fail = True
        store.plans = [Plan("pro", ()), Plan("max", ())]
        book.on_change("plan", "max")
        await eventually(lambda: book.load_errors >= 2)  # retried without a new notice
        assert book.plan("pro") is not None and book.plan("max") is None
        store.fail = False
        await eventually(lambda: book.plan("max") is not None)
    finally:
        await book.stop()


async def test_book_start_raises_when_the_first_load_fails() -> None:
    store = FakeStore()
    store.fail = True
    book = PlanBook(store.load)
    with pytest.raises(ConnectionError):
        await book.start()
    await book.stop()  # nothing started, nothing to stop


async def test_book_refreshes_without_notices() -> None:
    store = FakeStore()
    book = PlanBook(store.load, refresh_interval=0.05)
    await book.start()
    try:
        store.plans = [Plan("quiet", ())]
        await eventually(lambda: book.plan("quiet") is not None)
    finally:
        await book.stop()
