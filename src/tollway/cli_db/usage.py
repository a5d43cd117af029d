"""`tollway usage`: a usage report for a key, a user or a route."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import typer
from rich.text import Text

from tollway.cli_db import support
from tollway.cli_db.support import DataDirOpt, JsonOpt

# ---------------------------------------------------------------- usage


def usage(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    start: Annotated[
        str | None,
        typer.Option(
            "--from", help="start: ISO 8601 time, or a duration ago (default 24h; 30d by day)"
        ),
    ] = None,
    end: Annotated[
        str | None, typer.Option("--to", help="end: ISO 8601 time (default now)")
    ] = None,
    group_by: Annotated[str, typer.Option(help="hour or day")] = "hour",
    recent: Annotated[int, typer.Option(min=0, max=200, help="recent requests to show")] = 10,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """A key's usage: totals, error rate, latency percentiles, series, top routes."""
    from tollway.admin.schemas import UsageOut
    from tollway.admin.usage import default_window, report_out
    from tollway.identity import keys

    settings = support.load_settings(data_dir)
    ident = support.parse_key_id(key_id)
    if group_by not in ("hour", "day"):
        support.fail(f"--group-by: {group_by!r} is not hour or day", 2)
    grouping: Literal["hour", "day"] = "day" if group_by == "day" else "hour"
    from tollway.identity.errors import InvalidInput

    try:
        window_start, window_end = default_window(
            support.when_option(start, past=True, flag="--from"),
            support.when_option(end, past=True, flag="--to"),
            grouping,
        )
    except InvalidInput as exc:
        support.fail(f"--{exc.field}: {exc.message}", 2)
    if window_start >= window_end:
        support.fail("--from must be before --to", 2)

    async def work() -> UsageOut:
        from tollway.usage.stats import usage_report

        async with support.open_database(settings) as db, db.session() as session:
            key = await keys.get_key(session, ident)
            report = await usage_report(
                session,
                key_id=key.id,
                start=window_start,
                end=window_end,
                group_by=grouping,
                limit=max(recent, 1),
            )
            return report_out(
                report,
                key_id=key.id,
                user_id=None,
                route=None,
                start=window_start,
                end=window_end,
                group_by=grouping,
            )

    out = support.run(settings, work)
    if as_json:
        support.print_json(out)
        return
    _print_usage(out, recent)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _print_usage(out: Any, recent: int) -> None:
    console = support.stdout_console()
    t = out.totals
    console.print(
        Text.assemble(
            ("usage of key ", "bold"),
            str(out.key_id),
            " from ",
            support.fmt_time(out.start),
            " to ",
            support.fmt_time(out.end),
        ),
        soft_wrap=True,
    )
    with support.print_table(
        "totals", "requests", "errors", "error rate", "p50", "p95", "avg", "in", "out"
    ) as table:
        table.add_row(
            str(t.requests),
            str(t.errors),
            f"{t.error_rate:.2%}",
            _ms(t.latency_ms_p50),
            _ms(t.latency_ms_p95),
            _ms(t.latency_ms_avg),
            f"{t.bytes_in} B",
            f"{t.bytes_out} B",
        )
    if out.series:
        with support.print_table(
            f"per {out.group_by}", out.group_by, "requests", "errors", "p50", "p95"
        ) as table:
            for row in out.series:
                table.add_row(
                    support.fmt_time(row.period),
                    str(row.requests),
                    str(row.errors),
                    _ms(row.latency_ms_p50),
                    _ms(row.latency_ms_p95),
                )
    if out.top_routes:
        with support.print_table("top routes", "route", "requests") as table:
            for route in out.top_routes:
                table.add_row(route.route or "-", str(route.requests))
    if recent and out.recent.items:
        with support.print_table(
            "recent requests", "time", "method", "path", "status", "latency", "request id"
        ) as table:
            for r in out.recent.items[:recent]:
                table.add_row(
                    support.fmt_time(r.ts),
                    r.method,
                    r.path,
                    str(r.status),
                    _ms(r.latency_ms),
                    r.request_id or "-",
                )
