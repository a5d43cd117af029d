"""/usage: what keys and users did (totals, error rate, latency percentiles, series,
top routes from the hourly rollups; the recent raw records, paged)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from tollway.admin.deps import ERRORS_DOC, CursorQuery, LimitQuery, SessionDep
from tollway.admin.schemas import (
    UsageOut,
    UsagePeriod,
    UsageRecent,
    UsageRecordOut,
    UsageRoute,
    UsageTotals,
    UtcDatetime,
)
from tollway.identity import consumers, keys
from tollway.identity.errors import InvalidInput
from tollway.storage.pagination import DEFAULT_LIMIT
from tollway.usage.stats import UsageReport, usage_report

router = APIRouter(prefix="/usage", tags=["usage"], responses=ERRORS_DOC)

GroupBy = Literal["hour", "day"]
# What a report covers when `from` is not given: a day by hour, a month by day.
DEFAULT_SPAN: dict[str, timedelta] = {"hour": timedelta(days=1), "day": timedelta(days=30)}

FromQuery = Annotated[
    UtcDatetime | None,
    Query(alias="from", description="Start, inclusive (default: 24 h before `to`; 30 days by day)"),
]
ToQuery = Annotated[
    UtcDatetime | None, Query(alias="to", description="End, exclusive (default: now)")
]


def default_window(
    start: datetime | None, end: datetime | None, group_by: GroupBy
) -> tuple[datetime, datetime]:
    end = end or datetime.now(UTC)
    if start is not None:
        return start, end
    try:
        return end - DEFAULT_SPAN[group_by], end
    except OverflowError:
        # `to` in the first days of year 1: the default span reaches before it.
        raise InvalidInput(
            "`to` is too early for the default span; give `from` too", field="to"
        ) from None


def _window(
    start: datetime | None, end: datetime | None, group_by: GroupBy
) -> tuple[datetime, datetime]:
    start, end = default_window(start, end, group_by)
    if start >= end:
        raise InvalidInput("`from` must be before `to`", field="from")
    return start, end


def report_out(
    report: UsageReport,
    *,
    key_id: uuid.UUID | None,
    user_id: uuid.UUID | None,
    route: str | None,
    start: datetime,
    end: datetime,
    group_by: GroupBy,
) -> UsageOut:
    t = report.totals
    return UsageOut(
        key_id=key_id,
        user_id=user_id,
        route=route,
        start=start,
        end=end,
        group_by=group_by,
        totals=UsageTotals(
            requests=t.requests,
            errors=t.errors,
            error_rate=t.error_rate,
            bytes_in=t.bytes_in,
            bytes_out=t.bytes_out,
            latency_ms_avg=t.latency_ms_avg,
            latency_ms_p50=t.latency_ms_p50,
            latency_ms_p95=t.latency_ms_p95,
        ),
        series=[
            UsagePeriod(
                period=row.period,
                requests=row.requests,
                errors=row.errors,
                latency_ms_p50=row.latency_ms_p50,
                latency_ms_p95=row.latency_ms_p95,
            )
            for row in report.series
        ],
        top_routes=[
            UsageRoute(route=r.route, requests=r.requests, errors=r.errors)
            for r in report.top_routes
        ],
        recent=UsageRecent(
            items=[UsageRecordOut.of(r) for r in report.recent.items],
            next_cursor=report.recent.next_cursor,
        ),
    )


@router.get("/{key_id}", response_model=UsageOut)
async def key_usage(
    key_id: uuid.UUID,
    session: SessionDep,
    start: FromQuery = None,
    end: ToQuery = None,
    group_by: GroupBy = "hour",
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> UsageOut:
    """One key's usage over [from, to). `cursor`/`limit` page the recent records."""
    key = await keys.get_key(session, key_id)
    start, end = _window(start, end, group_by)
    report = await usage_report(
        session,
        key_id=key.id,
        start=start,
        end=end,
        group_by=group_by,
        cursor=cursor,
        limit=limit,
    )
    return report_out(
        report, key_id=key.id, user_id=key.consumer_id, route=None,
        start=start, end=end, group_by=group_by,
    )


@router.get("", response_model=UsageOut)
async def usage(
    session: SessionDep,
    user_id: uuid.UUID | None = None,
    route: Annotated[str | None, Query(max_length=200, description="A route name")] = None,
    start: FromQuery = None,
    end: ToQuery = None,
    group_by: GroupBy = "hour",
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> UsageOut:
    """Usage of one user, one route, both, or everyone, over [from, to)."""
    if user_id is not None:
        await consumers.get_consumer(session, user_id)
    start, end = _window(start, end, group_by)
    report = await usage_report(
        session,
        consumer_id=user_id,
        route=route,
        start=start,
        end=end,
        group_by=group_by,
        cursor=cursor,
        limit=limit,
    )
    return report_out(
        report, key_id=None, user_id=user_id, route=route,
        start=start, end=end, group_by=group_by,
    )
