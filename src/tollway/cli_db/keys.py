"""`tollway keys`: create, list, disable, enable, revoke and rotate API keys."""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import typer
from rich.text import Text

from tollway.cli_db import support
from tollway.cli_db.support import CursorOpt, DataDirOpt, JsonOpt, LimitOpt

if TYPE_CHECKING:
    from tollway.storage.models import ApiKey


keys_app = typer.Typer(
    name="keys", help="API keys: create, list, disable, rotate.", no_args_is_help=True
)


def _limits(key: ApiKey) -> str:
    minute = f"{key.limit_per_minute}/min" if key.limit_per_minute else "-/min"
    day = f"{key.limit_per_day}/day" if key.limit_per_day else "-/day"
    return f"{minute} {day}"


def _key_fields(k: ApiKey, email: str | None = None) -> list[tuple[str, str]]:
    user = f"{k.consumer_id} ({email})" if email else str(k.consumer_id)
    return [
        ("id", str(k.id)),
        ("user", user),
        ("name", k.name or "-"),
        ("prefix", k.prefix + "…"),
        ("status", k.status),
        ("limits", _limits(k)),
        ("scopes", ", ".join(k.scopes or []) or "all routes"),
        ("expires", support.fmt_time(k.expires_at)),
        ("last used", support.fmt_time(k.last_used_at)),
        ("created", support.fmt_time(k.created_at)),
    ]


def _key_table(items: list[ApiKey], emails: dict[uuid.UUID, str]) -> None:
    columns = ("id", "prefix", "status", "email", "name", "limits", "expires", "last used")
    with support.print_table(None, *columns) as table:
        for k in items:
            table.add_row(
                str(k.id),
                k.prefix + "…",
                k.status,
                emails.get(k.consumer_id, str(k.consumer_id)),
                k.name or "-",
                _limits(k),
                support.fmt_day(k.expires_at),
                support.fmt_day(k.last_used_at),
            )


def _show_raw_key(raw: str, headline: str) -> None:
    """The raw key, on a line of its own, never wrapped or cut: shown only now."""
    err = support.stderr_console()
    err.print(Text(headline, style="bold green"), soft_wrap=True)
    err.print(
        Text("Store it now: Tollway keeps only its hash and cannot show it again.", style="bold"),
        soft_wrap=True,
    )
    # stdout, alone on its line, so `KEY=$(tollway keys create ... | tail -n1)` works.
    typer.echo(raw)


# ---------------------------------------------------------------- keys


@keys_app.command("create")
def keys_create(
    user: Annotated[str, typer.Argument(help="user id or email")],
    name: Annotated[str, typer.Option(help="a label for the key")] = "",
    per_minute: Annotated[int | None, typer.Option(min=1, help="requests per minute")] = None,
    per_day: Annotated[int | None, typer.Option(min=1, help="requests per day")] = None,
    scope: Annotated[
        list[str] | None,
        typer.Option(help='allowed route name or "tag:<tag>" (repeat; none: all routes)'),
    ] = None,
    expires: Annotated[
        str | None, typer.Option(help="expiry: ISO 8601 time, or a duration such as 90d")
    ] = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Create an API key for a user and print it (once)."""
    from tollway.admin.schemas import KeyCreated, KeyOut
    from tollway.identity import keys
    from tollway.identity.keys import NewKey

    settings = support.load_settings(data_dir)
    expires_at = support.when_option(expires, past=False, flag="--expires")

    async def work() -> tuple[NewKey, str]:
        async with support.open_database(settings) as db, db.session() as session:
            consumer = await support.find_user(session, user)
            new = await keys.create_key(
                session,
                await db.pepper(),
                consumer_id=consumer.id,
                name=name,
                limit_per_minute=per_minute,
                limit_per_day=per_day,
                scopes=tuple(scope or ()),
                expires_at=expires_at,
            )
            await db.commit_and_announce(session)
            return new, consumer.email

    new, email = support.run(settings, work)
    if as_json:
        support.print_json(KeyCreated(**KeyOut.fields_of(new.key), key=new.raw))
        return
    support.print_record(f"created key for {email}", _key_fields(new.key, email))
    _show_raw_key(new.raw, f"API key {new.key.id}:")


@keys_app.command("list")
def keys_list(
    user: Annotated[str | None, typer.Option(help="only this user's keys (id or email)")] = None,
    status: Annotated[str | None, typer.Option(help="active, disabled or revoked")] = None,
    limit: LimitOpt = 50,
    cursor: CursorOpt = None,
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """List keys, newest first (prefixes only; secrets are never shown again)."""
    from tollway.admin.schemas import KeyList, KeyOut
    from tollway.identity import keys
    from tollway.storage.pagination import Page

    settings = support.load_settings(data_dir)

    async def work() -> tuple[Page[ApiKey], dict[uuid.UUID, str]]:
        from sqlalchemy import select

        from tollway.storage.models import Consumer

        async with support.open_database(settings) as db, db.session() as session:
            consumer_id = (await support.find_user(session, user)).id if user else None
            page = await keys.list_keys(
                session, consumer_id=consumer_id, status=status, cursor=cursor, limit=limit
            )
            # People read emails, not user ids: one query for the page's owners.
            owners = {k.consumer_id for k in page.items}
            emails: dict[uuid.UUID, str] = {}
            if owners:
                rows = await session.execute(
                    select(Consumer.id, Consumer.email).where(Consumer.id.in_(owners))
                )
                emails = {ident: email for ident, email in rows}
            return page, emails

    page, emails = support.run(settings, work)
    if as_json:
        support.print_json(
            KeyList(items=[KeyOut.of(k) for k in page.items], next_cursor=page.next_cursor)
        )
        return
    _key_table(page.items, emails)
    support.next_page_hint(page.next_cursor, "tollway keys list")


def _set_key_status(
    key_id: str, status: Literal["active", "disabled"], data_dir: Path | None, as_json: bool
) -> None:
    from tollway.admin.schemas import KeyOut
    from tollway.identity import keys

    settings = support.load_settings(data_dir)
    ident = support.parse_key_id(key_id)

    async def work() -> ApiKey:
        async with support.open_database(settings) as db, db.session() as session:
            key = await keys.update_key(session, ident, status=status)
            await db.commit_and_announce(session)
            return key

    key = support.run(settings, work)
    if as_json:
        support.print_json(KeyOut.of(key))
        return
    typer.echo(f"key {key.id} ({key.prefix}…) is {key.status}")


@keys_app.command("disable")
def keys_disable(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Disable a key (gateways refuse it within a second; `keys enable` undoes it)."""
    _set_key_status(key_id, "disabled", data_dir, as_json)


@keys_app.command("enable")
def keys_enable(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Enable a disabled key again (a revoked key stays revoked)."""
    _set_key_status(key_id, "active", data_dir, as_json)


@keys_app.command("revoke")
def keys_revoke(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke a key for good (its record and usage history stay)."""
    from tollway.admin.schemas import KeyOut
    from tollway.identity import keys

    settings = support.load_settings(data_dir)
    ident = support.parse_key_id(key_id)

    async def work() -> ApiKey:
        async with support.open_database(settings) as db, db.session() as session:
            key = await keys.revoke_key(session, ident)
            await db.commit_and_announce(session)
            return key

    key = support.run(settings, work)
    if as_json:
        support.print_json(KeyOut.of(key))
        return
    typer.echo(f"key {key.id} ({key.prefix}…) is revoked")


@keys_app.command("rotate")
def keys_rotate(
    key_id: Annotated[str, typer.Argument(help="the key's id")],
    grace: Annotated[
        str, typer.Option(help="how long the current secret keeps working (0 stops it now)")
    ] = "24h",
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Issue a new secret for a key and print it (once); the old one stops after --grace."""
    from tollway.admin.keys import previous_secret_expiry
    from tollway.admin.schemas import KeyOut, KeyRotated
    from tollway.identity import keys
    from tollway.identity.apikeys import hash_key
    from tollway.identity.keys import NewKey

    settings = support.load_settings(data_dir)
    ident = support.parse_key_id(key_id)
    try:
        grace_delta = support.parse_duration(grace)
    except ValueError as exc:
        support.fail(f"--grace: {exc}", 2)

    async def work() -> tuple[NewKey, datetime | None]:
        async with support.open_database(settings) as db, db.session() as session:
            pepper = await db.pepper()
            new = await keys.rotate_key(session, pepper, ident, grace=grace_delta)
            previous = await previous_secret_expiry(session, ident, hash_key(pepper, new.raw))
            await db.commit_and_announce(session)
            return new, previous

    new, previous = support.run(settings, work)
    if as_json:
        support.print_json(
            KeyRotated(**KeyOut.fields_of(new.key), key=new.raw, previous_expires_at=previous)
        )
        return
    until = (
        f"the previous secret works until {support.fmt_time(previous)}"
        if previous
        else ("there was no previous secret")
    )
    _show_raw_key(new.raw, f"new secret for key {new.key.id} ({until}):")
