"""Usage statistics: totals, a series, top routes (from rollups) and recent raw rows.

Totals, series and top routes read usage_hourly only, so a report over months
costs a few thousand rollup rows whatever the traffic, never a scan of raw rows.
Rollups are hourly, so they cover whole hours: every hour that starts in
[floor_hour(start), end), i.e. each hour overlapping the range. The recent raw rows
use the exact range [start, end), newest first (ts, then id), cursor-paged.

Definitions:
- errors: requests answered with status >= 400 (gateway refusals included);
  error_rate = errors / requests (0.0 when there were no requests).
- latency: the total latency the gateway measured (first request byte to last
  response byte), in ms. latency_ms_avg is exact (a sum in the rollups).
- p50/p95 are estimates from the latency buckets (LATENCY_BUCKET_BOUNDS_MS): the
  bucket that holds the quantile is found exactly, then the value is interpolated
  linearly inside it (between the previous bucket's bound, 0 for the first, and its
  own), as Prometheus' histogram_quantile does; the estimate is off by at most the
  width of that bucket. The last bucket has no upper bound: a quantile that falls in
  it is reported as its lower bound (60 000 ms), an underestimate.
- group_by "day" sums the hours of each UTC day; "hour" gives one row per hour.
  Only periods with traffic appear in the series (no zero rows).
"""

from __future__ import annotations

import math
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.identity.errors import InvalidInput
from tollway.storage.models import (
    LATENCY_BUCKET_BOUNDS_MS,
    LATENCY_BUCKET_COLUMNS,
    UsageHourly,
    UsageRecord,
)
from tollway.storage.pagination import DEFAULT_LIMIT, Page, keyset_page

TOP_ROUTES = 10
GroupBy = Literal["hour", "day"]


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int
    errors: int
    error_rate: float
    bytes_in: int
    bytes_out: int
    # None when there were no requests.
    latency_ms_avg: float | None
    latency_ms_p50: float | None
    latency_ms_p95: float | None


@dataclass(frozen=True, slots=True)
class UsagePeriod:
    period: datetime  # start of the hour or UTC day
    requests: int
    errors: int
    latency_ms_p50: float | None
    latency_ms_p95: float | None


@dataclass(frozen=True, slots=True)
class RouteUsage:
    route: str | None  # None: requests that matched no named route
    requests: int
    errors: int


@dataclass(frozen=True, slots=True)
class UsageReport:
    start: datetime
    end: datetime
    group_by: GroupBy
    totals: UsageTotals
    series: list[UsagePeriod]
    top_routes: list[RouteUsage]
    recent: Page[UsageRecord]


def quantile_ms(buckets: list[int] | tuple[int, ...], q: float) -> float | None:
    """Estimate the q-quantile latency (ms) from per-bucket counts (see module doc)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count <= 0:
            continue
        if seen + count >= rank:
            lower = 0.0 if i == 0 else LATENCY_BUCKET_BOUNDS_MS[i - 1]
            upper = LATENCY_BUCKET_BOUNDS_MS[i]
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * max(rank - seen, 0.0) / count
        seen += count
    return LATENCY_BUCKET_BOUNDS_MS[-2]


def _check_range(start: datetime, end: datetime, group_by: str) -> None:
    if start.tzinfo is None:
        raise InvalidInput("`from` needs a timezone (UTC offset)", field="from")
    if end.tzinfo is None:
        raise InvalidInput("`to` needs a timezone (UTC offset)", field="to")
    if start >= end:
        raise InvalidInput("`from` must be before `to`", field="from")
    if group_by not in ("hour", "day"):
        raise InvalidInput("group_by must be hour or day", field="group_by")


def _check_route(route: str | None) -> None:
    # No route name holds NUL, and PostgreSQL refuses it in a text parameter.
    if route is not None and "\x00" in route:
        raise InvalidInput("route must not contain NUL characters", field="route")


def _hourly_filters(
    key_id: uuid.UUID | None, consumer_id: uuid.UUID | None, route: str | None,
    start: datetime, end: datetime,
) -> list[ColumnElement[bool]]:
    first_hour = start.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    where = [UsageHourly.hour >= first_hour, UsageHourly.hour < end]
    if key_id is not None:
        where.append(UsageHourly.key_id == str(key_id))
    if consumer_id is not None:
        where.append(UsageHourly.consumer_id == consumer_id)
    if route is not None:
        where.append(UsageHourly.route == route)
    return where


_BUCKETS = [getattr(UsageHourly, c) for c in LATENCY_BUCKET_COLUMNS]


class _Acc:
    """Sums of rollup rows: one per period, and one for the totals."""

    __slots__ = ("buckets", "bytes_in", "bytes_out", "errors", "latency_sum", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.buckets = [0] * len(LATENCY_BUCKET_COLUMNS)

    def add(self, row: Any) -> None:
        self.requests += int(row.requests or 0)
        self.errors += int(row.errors or 0)
        self.latency_sum += float(row.latency_ms_sum or 0.0)
        self.bytes_in += int(row.bytes_in or 0)
        self.bytes_out += int(row.bytes_out or 0)
        for i, column in enumerate(LATENCY_BUCKET_COLUMNS):
            self.buckets[i] += int(getattr(row, column) or 0)

    def period(self, start: datetime) -> UsagePeriod:
        return UsagePeriod(
            period=start,
            requests=self.requests,
            errors=self.errors,
            latency_ms_p50=quantile_ms(self.buckets, 0.50),
            latency_ms_p95=quantile_ms(self.buckets, 0.95),
        )

    def totals(self) -> UsageTotals:
        return UsageTotals(
            requests=self.requests,
            errors=self.errors,
            error_rate=self.errors / self.requests if self.requests else 0.0,
            bytes_in=self.bytes_in,
            bytes_out=self.bytes_out,
            latency_ms_avg=self.latency_sum / self.requests if self.requests else None,
            latency_ms_p50=quantile_ms(self.buckets, 0.50),
            latency_ms_p95=quantile_ms(self.buckets, 0.95),
        )


def _day_of(hour: datetime) -> datetime:
    return hour.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def usage_report(
    session: AsyncSession,
    *,
    key_id: uuid.UUID | None = None,
    consumer_id: uuid.UUID | None = None,
    route: str | None = None,
    start: datetime,
    end: datetime,
    group_by: GroupBy = "hour",
    cursor: str | None = None,
    limit: int | None = DEFAULT_LIMIT,
) -> UsageReport:
    """Usage over [start, end), filtered by any of key, consumer and route.

    Raises InvalidInput (field "from", "to", "group_by" or "cursor") for a bad range,
    grouping or cursor.
    """
    _check_range(start, end, group_by)
    _check_route(route)
    where = _hourly_filters(key_id, consumer_id, route, start, end)

    # One grouped query per hour: the series, and the totals summed from it.
    hourly = await session.execute(
        select(
            UsageHourly.hour,
            func.sum(UsageHourly.requests).label("requests"),
            func.sum(UsageHourly.errors).label("errors"),
            func.sum(UsageHourly.latency_ms_sum).label("latency_ms_sum"),
            func.sum(UsageHourly.bytes_in).label("bytes_in"),
            func.sum(UsageHourly.bytes_out).label("bytes_out"),
            *(func.sum(col).label(name) for col, name in
              zip(_BUCKETS, LATENCY_BUCKET_COLUMNS, strict=True)),
        )
        .where(*where)
        .group_by(UsageHourly.hour)
        .order_by(UsageHourly.hour)
    )
    totals = _Acc()
    periods: dict[datetime, _Acc] = {}
    for row in hourly:
        totals.add(row)
        hour: datetime = row.hour
        period = hour if group_by == "hour" else _day_of(hour)
        acc = periods.get(period)
        if acc is None:
            acc = periods[period] = _Acc()
        acc.add(row)
    series = [acc.period(p) for p, acc in sorted(periods.items())]

    requests_sum = func.sum(UsageHourly.requests)
    top = await session.execute(
        select(
            UsageHourly.route,
            requests_sum.label("requests"),
            func.sum(UsageHourly.errors).label("errors"),
        )
        .where(*where)
        .group_by(UsageHourly.route)
        .order_by(requests_sum.desc(), UsageHourly.route)
        .limit(TOP_ROUTES)
    )
    top_routes = [
        RouteUsage(route=r.route or None, requests=int(r.requests), errors=int(r.errors))
        for r in top
    ]

    raw = select(UsageRecord).where(UsageRecord.ts >= start, UsageRecord.ts < end)
    if key_id is not None:
        raw = raw.where(UsageRecord.key_id == key_id)
    if consumer_id is not None:
        raw = raw.where(UsageRecord.consumer_id == consumer_id)
    if route is not None:
        raw = raw.where(UsageRecord.route == route)
    recent = await keyset_page(
        session, raw, ts_column=UsageRecord.ts, id_column=UsageRecord.id,
        cursor=cursor, limit=limit,
    )
    return UsageReport(
        start=start,
        end=end,
        group_by=group_by,
        totals=totals.totals(),
        series=series,
        top_routes=top_routes,
        recent=recent,
    )

