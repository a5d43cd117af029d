"""`tollway users`: create, list and disable users (consumers)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from tollway.cli_db import support
from tollway.cli_db.support import CursorOpt, DataDirOpt, JsonOpt, LimitOpt

if TYPE_CHECKING:
    from tollway.storage.models import Consumer


users_app = typer.Typer(
    name="users", help="Users (consumers): create, list, disable.", no_args_is_help=True
)


def _user_fields(c: Consumer) -> list[tuple[str, str]]:
    return [
        ("id", str(c.id)),
        ("email", c.email),
        ("name", c.name or "-"),
        ("status", c.status),
        ("plan", c.plan or "-"),
        ("created", support.fmt_time(c.created_at)),
    ]


def _user_table(items: list[Consumer]) -> None:
    with support.print_table(None, "id", "email", "name", "status", "plan", "created") as table:
        for c in items:
            table.add_row(
                str(c.id),
                c.email,
                c.name or "-",
                c.status,
                c.plan or "-",
                support.fmt_day(c.created_at),
            )


# ---------------------------------------------------------------- users


@users_app.command("create")
def users_create(
    email: Annotated[str, typer.Argument(help="the user's email (unique)")],
    name: Annotated[str, typer.Option(help="display name")] = "",
    plan: Annotated[str | None, typer.Option(help="plan code")] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a user, or show the one with this email."""
    from tollway.admin.schemas import UserOut
    from tollway.identity import consumers, plans

    settings = support.load_settings(data_dir)

    async def work() -> tuple[Consumer, bool]:
        async with support.open_database(settings) as db, db.session() as session:
            consumer, created = await consumers.create_or_get(
                session, email=email, name=name, plan=plan
            )
            if created and plan is not None:
                await plans.require_plan(session, plan)  # no user with an unknown plan
            await db.commit_and_announce(session)
            return consumer, created

    consumer, created = support.run(settings, work)
    if as_json:
        support.print_json({**UserOut.of(consumer).model_dump(mode="json"), "created": created})
        return
    support.print_record(
        "created user" if created else "a user with this email exists", _user_fields(consumer)
    )


@users_app.command("list")
def users_list(
    status: Annotated[str | None, typer.Option(help="active or disabled")] = None,
    email: Annotated[str | None, typer.Option(help="exact email")] = None,
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List users, newest first."""
    from tollway.admin.schemas import UserList, UserOut
    from tollway.identity import consumers
    from tollway.storage.pagination import Page

    settings = support.load_settings(data_dir)

    async def work() -> Page[Consumer]:
        async with support.open_database(settings) as db, db.session() as session:
            return await consumers.list_consumers(
                session, email=email, status=status, cursor=cursor, limit=limit
            )

    page = support.run(settings, work)
    if as_json:
        support.print_json(
            UserList(items=[UserOut.of(c) for c in page.items], next_cursor=page.next_cursor)
        )
        return
    _user_table(page.items)
    support.next_page_hint(page.next_cursor, "tollway users list")


@users_app.command("disable")
def users_disable(
    user: Annotated[str, typer.Argument(help="user id or email")],
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Disable a user and revoke all their keys (records and usage history stay)."""
    from tollway.admin.schemas import UserOut
    from tollway.identity import consumers

    settings = support.load_settings(data_dir)

    async def work() -> tuple[Consumer, int]:
        from sqlalchemy import func, select

        from tollway.storage.models import ApiKey

        async with support.open_database(settings) as db, db.session() as session:
            consumer = await support.find_user(session, user)
            live = await session.scalar(
                select(func.count()).where(
                    ApiKey.consumer_id == consumer.id, ApiKey.status != "revoked"
                )
            )
            consumer = await consumers.disable_consumer(session, consumer.id)
            await db.commit_and_announce(session)
            return consumer, int(live or 0)

    consumer, revoked = support.run(settings, work)
    if as_json:
        support.print_json(UserOut.of(consumer))
        return
    typer.echo(f"disabled {consumer.email} ({consumer.id}); revoked {revoked} key(s)")
