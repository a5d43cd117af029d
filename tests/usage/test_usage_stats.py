"""usage_report: totals, series, percentiles, top routes from rollups; recent rows paged."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete
from usage_helpers import event, usage_settings

from tollway.identity.errors import InvalidInput
from tollway.storage.database import Database
from tollway.storage.models import UsageRecord
from tollway.usage.events import UsageEvent
from tollway.usage.recorder import UsageRecorder
from tollway.usage.stats import quantile_ms, usage_report

C1, C2, C3 = (uuid.UUID(int=i) for i in (1, 2, 3))
K1, K2, K3 = (uuid.UUID(int=i) for i in (11, 12, 13))
START = datetime(2025, 3, 9, 22, 0, tzinfo=UTC)
END = datetime(2025, 3, 10, 2, 0, tzinfo=UTC)
_seq = iter(range(1_000_000))


def burst(
    count: int, at: datetime, *, consumer: uuid.UUID, key: uuid.UUID, route: str,
    latency: float, errors: int = 0, error_status: int = 500,
) -> list[UsageEvent]:
    """`count` requests a second apart from `at`; the first `errors` of them fail."""
    return [
        event(
            next(_seq),
            ts=at + timedelta(seconds=i),
            consumer_id=consumer,
            key_id=key,
            route=route,
            latency_ms=latency,
            status=error_status if i < errors else 200,
            bytes_in=1,
            bytes_out=10,
        )
        for i in range(count)
    ]


async def load(database: Database, events: Iterable[UsageEvent]) -> None:
    recorder = UsageRecorder(database, usage_settings(), purge_interval=None)
    recorder.start()
    for e in events:
        recorder.record(e)
    await recorder.stop(10)
    assert recorder.dropped == 0


@pytest.fixture
async def traffic(database: Database) -> Database:
    day9, day10 = datetime(2025, 3, 9, tzinfo=UTC), datetime(2025, 3, 10, tzinfo=UTC)
    await load(database, [
        # K1 (consumer C1): three hours across midnight UTC.
        *burst(10, day9 + timedelta(hours=22, minutes=10), consumer=C1, key=K1,
               route="images", latency=3),
        *burst(10, day9 + timedelta(hours=23, minutes=30), consumer=C1, key=K1,
               route="text", latency=30, errors=5),
        *burst(20, day10 + timedelta(minutes=15), consumer=C1, key=K1,
               route="images", latency=150, errors=2, error_status=404),
        # K2, also C1's.
        *burst(5, day10 + timedelta(hours=1, minutes=5), consumer=C1, key=K2,
               route="video", latency=700),
        # K3, consumer C2.
        *burst(7, day10 + timedelta(minutes=40), consumer=C2, key=K3,
               route="images", latency=8),
        # Outside the range on both sides.
        *burst(3, day9 - timedelta(days=1), consumer=C1, key=K1, route="images", latency=3),
        *burst(3, END, consumer=C1, key=K1, route="images", latency=3),
    ])
    return database


async def report(database: Database, **kwargs: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {"start": START, "end": END}
    values.update(kwargs)
    async with database.sessions() as session:
        return await usage_report(session, **values)  # type: ignore[arg-type]


async def test_key_totals_error_rate_and_percentiles(traffic: Database) -> None:
    r = await report(traffic, key_id=K1)
    t = r.totals
    assert t.requests == 40
    assert t.errors == 7  # 5 x 500 and 2 x 404: status >= 400
    assert t.error_rate == pytest.approx(7 / 40)
    assert t.bytes_in == 40
    assert t.bytes_out == 400
    assert t.latency_ms_avg == pytest.approx((10 * 3 + 10 * 30 + 20 * 150) / 40)
    # Buckets: 10 in (2, 5], 10 in (20, 50], 20 in (100, 200]. The median is the
    # 20th request: the last of the (20, 50] bucket; p95 the 38th: 18/20 into
    # the (100, 200] bucket, interpolated linearly.
    assert t.latency_ms_p50 == pytest.approx(50.0)
    assert t.latency_ms_p95 == pytest.approx(190.0)
    # Whatever the interpolation, a percentile stays inside its bucket.
    assert 20 < t.latency_ms_p50 <= 50
    assert 100 < t.latency_ms_p95 <= 200


async def test_series_by_hour_and_by_utc_day(traffic: Database) -> None:
    by_hour = (await report(traffic, key_id=K1)).series
    assert [(p.period, p.requests, p.errors) for p in by_hour] == [
        (datetime(2025, 3, 9, 22, tzinfo=UTC), 10, 0),
        (datetime(2025, 3, 9, 23, tzinfo=UTC), 10, 5),
        (datetime(2025, 3, 10, 0, tzinfo=UTC), 20, 2),
    ]
    assert by_hour[0].latency_ms_p50 == pytest.approx(3.5)  # 5/10 into (2, 5]
    assert 100 < (by_hour[2].latency_ms_p95 or 0) <= 200

    by_day = (await report(traffic, key_id=K1, group_by="day")).series
    assert [(p.period, p.requests, p.errors) for p in by_day] == [
        (datetime(2025, 3, 9, tzinfo=UTC), 20, 5),
        (datetime(2025, 3, 10, tzinfo=UTC), 20, 2),
    ]
    # Day 9: 10 in (2, 5] and 10 in (20, 50]; its median is the 10th request.
    assert by_day[0].latency_ms_p50 == pytest.approx(5.0)


async def test_top_routes_and_filters(traffic: Database) -> None:
    consumer = await report(traffic, consumer_id=C1)
    assert consumer.totals.requests == 45
    assert [(r.route, r.requests) for r in consumer.top_routes] == [
        ("images", 30), ("text", 10), ("video", 5),
    ]
    assert [(r.route, r.errors) for r in consumer.top_routes] == [
        ("images", 2), ("text", 5), ("video", 0),
    ]

    everyone = await report(traffic)
    assert everyone.totals.requests == 52
    images = await report(traffic, route="images")
    assert images.totals.requests == 37
    assert [r.route for r in images.top_routes] == ["images"]
    both = await report(traffic, consumer_id=C1, route="video")
    assert both.totals.requests == 5
    assert (await report(traffic, key_id=K3)).totals.requests == 7


async def test_top_routes_keep_the_ten_busiest(database: Database) -> None:
    at = START + timedelta(minutes=5)
    events: list[UsageEvent] = []
    for i in range(12):
        events += burst(i + 1, at, consumer=C3, key=K3, route=f"r{i:02d}", latency=1)
    await load(database, events)
    top = (await report(database, consumer_id=C3)).top_routes
    assert [(r.route, r.requests) for r in top] == [(f"r{i:02d}", i + 1) for i in range(11, 1, -1)]


async def test_recent_rows_newest_first_cursor_paged(traffic: Database) -> None:
    seen: list[UsageRecord] = []
    cursor = None
    pages = 0
    while True:
        page = (await report(traffic, key_id=K1, cursor=cursor, limit=15)).recent
        seen += page.items
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert pages == 3
    assert len(seen) == 40  # in range only: not the 3 before nor the 3 at `end`
    assert len({r.id for r in seen}) == 40
    stamps = [r.ts for r in seen]
    assert stamps == sorted(stamps, reverse=True)
    assert all(START <= ts < END for ts in stamps)
    assert all(r.key_id == K1 for r in seen)


async def test_statistics_come_from_rollups_not_raw_rows(traffic: Database) -> None:
    before = await report(traffic, consumer_id=C1)
    async with traffic.sessions() as session:
        await session.execute(delete(UsageRecord))
        await session.commit()
    after = await report(traffic, consumer_id=C1)
    assert after.totals == before.totals
    assert after.series == before.series
    assert after.top_routes == before.top_routes
    assert after.recent.items == []


async def test_rollups_cover_whole_hours_raw_rows_the_exact_range(traffic: Database) -> None:
    r = await report(traffic, key_id=K1, start=START + timedelta(minutes=15))
    # The 22:00 hour overlaps [22:15, end): its rollup counts whole.
    assert r.totals.requests == 40
    # Raw rows honour the exact start: the 22:10 burst (10 rows) is out.
    assert len(r.recent.items) == 30


async def test_empty_report(database: Database) -> None:
    r = await report(database, key_id=K1)
    assert r.totals.requests == 0
    assert r.totals.error_rate == 0.0
    assert r.totals.latency_ms_avg is None
    assert r.totals.latency_ms_p50 is None
    assert r.series == []
    assert r.top_routes == []
    assert r.recent.items == []
    assert r.recent.next_cursor is None


async def test_invalid_range_grouping_and_cursor(database: Database) -> None:
    with pytest.raises(InvalidInput) as exc:
        await report(database, start=END, end=START)
    assert exc.value.field == "from"
    with pytest.raises(InvalidInput) as exc:
        await report(database, start=END, end=END)
    assert exc.value.field == "from"
    with pytest.raises(InvalidInput) as exc:
        await report(database, end=datetime(2025, 3, 10))
    assert exc.value.field == "to"
    with pytest.raises(InvalidInput) as exc:
        await report(database, group_by="week")
    assert exc.value.field == "group_by"
    with pytest.raises(InvalidInput) as exc:
        await report(database, cursor="not-a-cursor")
    assert exc.value.field == "cursor"


def test_quantile_estimates() -> None:
    empty = [0] * 16
    assert quantile_ms(empty, 0.5) is None
    one_bucket = [0] * 16
    one_bucket[0] = 4  # all within (0, 1] ms
    assert quantile_ms(one_bucket, 0.5) == pytest.approx(0.5)
    assert quantile_ms(one_bucket, 1.0) == pytest.approx(1.0)
    slowest = [0] * 16
    slowest[15] = 1  # over 60 s: no upper bound, reported as its lower bound
    assert quantile_ms(slowest, 0.95) == 60_000
    split = [0] * 16
    split[3] = 50  # (5, 10]
    split[9] = 50  # (500, 1000]
    assert quantile_ms(split, 0.5) == pytest.approx(10.0)
    assert quantile_ms(split, 0.95) == pytest.approx(500 + 500 * 45 / 50)
