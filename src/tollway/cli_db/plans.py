"""`tollway plans`: create, list and delete plans (named rate-limit windows)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from tollway.cli_db import support
from tollway.cli_db.support import CursorOpt, DataDirOpt, JsonOpt, LimitOpt

if TYPE_CHECKING:
    from tollway.storage.models import Plan as PlanRow


plans_app = typer.Typer(
    name="plans",
    help="Plans (named rate-limit windows): create, list, delete.",
    no_args_is_help=True,
)


# ---------------------------------------------------------------- plans


def parse_window(text: str) -> dict[str, Any]:
    """A --window value as a window's JSON form: second=10, minute=60,burst=100 or
    day=1000,cost=2 (the values are checked by identity.plans, which names what is wrong)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    window: dict[str, Any] = {}
    for i, part in enumerate(parts):
        name, sep, value = part.partition("=")
        if not sep or not value.strip().isdigit():
            raise ValueError(f"{text!r}: expected PER=LIMIT[,burst=N][,cost=N], like minute=60")
        if i == 0:
            window["per"], window["limit"] = name.strip(), int(value)
        elif name.strip() in ("burst", "cost"):
            window[name.strip()] = int(value)
        else:
            raise ValueError(f"{text!r}: only burst= and cost= may follow PER=LIMIT")
    if not window:
        raise ValueError("an empty --window")
    return window


def _plan_windows(row: PlanRow) -> str:
    parts = []
    for w in row.limits or []:
        extra = "".join(f" {k} {w[k]}" for k in ("burst", "cost") if w.get(k) is not None)
        parts.append(f"{w['limit']}/{w['per']}{extra}")
    return ", ".join(parts) or "no limits"


@plans_app.command("create")
def plans_create(
    name: Annotated[str, typer.Argument(help="the plan's name (users' `plan` names it)")],
    window: Annotated[
        list[str] | None,
        typer.Option(help="PER=LIMIT[,burst=N][,cost=N], e.g. minute=60,burst=100 (repeat)"),
    ] = None,
    description: Annotated[str, typer.Option(help="what the plan is for")] = "",
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a plan."""
    from tollway.admin.schemas import PlanOut
    from tollway.identity import plans

    settings = support.load_settings(data_dir)
    try:
        windows = [parse_window(w) for w in window or []]
    except ValueError as exc:
        support.fail(f"--window: {exc}", 2)

    async def work() -> PlanRow:
        async with support.open_database(settings) as db, db.session() as session:
            row = await plans.create_plan(
                session, name=name, limits=windows, description=description
            )
            await db.commit_and_announce(session)
            return row

    row = support.run(settings, work)
    if as_json:
        support.print_json(PlanOut.of(row))
        return
    fields = [("name", row.name), ("limits", _plan_windows(row))]
    support.print_record("created plan", [*fields, ("description", row.description or "-")])


@plans_app.command("list")
def plans_list(
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List plans, newest first."""
    from tollway.admin.schemas import PlanList, PlanOut
    from tollway.identity import plans
    from tollway.storage.pagination import Page

    settings = support.load_settings(data_dir)

    async def work() -> tuple[Page[PlanRow], dict[str, int]]:
        async with support.open_database(settings) as db, db.session() as session:
            page = await plans.list_plans(session, cursor=cursor, limit=limit)
            users = {p.name: await plans.users_of(session, p.name) for p in page.items}
            return page, users

    page, users = support.run(settings, work)
    if as_json:
        support.print_json(
            PlanList(items=[PlanOut.of(p) for p in page.items], next_cursor=page.next_cursor)
        )
        return
    with support.print_table(None, "name", "limits", "users", "description") as table:
        for p in page.items:
            table.add_row(p.name, _plan_windows(p), str(users[p.name]), p.description or "-")
    support.next_page_hint(page.next_cursor, "tollway plans list")


@plans_app.command("delete")
def plans_delete(
    name: Annotated[str, typer.Argument(help="the plan's name")],
    data_dir: DataDirOpt = None,
) -> None:
    """Delete a plan that no user has."""
    from tollway.identity import plans

    settings = support.load_settings(data_dir)

    async def work() -> None:
        async with support.open_database(settings) as db, db.session() as session:
            await plans.delete_plan(session, name)
            await db.commit_and_announce(session)

    support.run(settings, work)
    typer.echo(f"deleted plan {name}")
