"""The `tollway` commands that work on the database directly: migrate, users, keys,
plans, usage, admin-token.

They read the same TOLLWAY_* settings as the server (TOLLWAY_DATABASE_URL, else the
SQLite file in TOLLWAY_DATA_DIR; TOLLWAY_KEY_PEPPER, else data_dir/key_pepper), so
they work before any server runs, and bring the schema up to date first as the
server does. Changes are announced to running gateways over Redis when
TOLLWAY_REDIS_URL is set; gateways also pick them up from the database's
invalidation outbox within a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn, TypeVar

import typer
from pydantic import BaseModel, ValidationError
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tollway.settings import Settings

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from sqlalchemy.ext.asyncio import AsyncSession

    from tollway.storage.database import Database
    from tollway.storage.models import ApiKey, Consumer
    from tollway.storage.models import Plan as PlanRow

T = TypeVar("T")

users_app = typer.Typer(
    name="users", help="Users (consumers): create, list, disable.", no_args_is_help=True
)
keys_app = typer.Typer(
    name="keys", help="API keys: create, list, disable, rotate.", no_args_is_help=True
)
plans_app = typer.Typer(
    name="plans",
    help="Plans (named rate-limit windows): create, list, delete.",
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add these commands to the `tollway` command."""
    app.command("migrate")(migrate)
    app.add_typer(users_app)
    app.add_typer(keys_app)
    app.add_typer(plans_app)
    app.command("usage")(usage)
    app.command("admin-token")(admin_token)


# ---------------------------------------------------------------- plumbing


# Output that goes to a file or a pipe is not cut to 80 columns: nobody's screen
# is there to fit, and a cut id cannot be pasted.
PIPED_WIDTH = 200


def _out() -> Console:
    # Made per command, not at import: the width (COLUMNS) is read when it is made.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console


def _err() -> Console:
    return Console(stderr=True, highlight=False)


class CliError(Exception):
    """A failure to report on one line and exit 1."""


def _fail(message: str, code: int = 1) -> NoReturn:
    _err().print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _warn(message: str) -> None:
    _err().print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def _settings(data_dir: Path | None) -> Settings:
    try:
        return Settings() if data_dir is None else Settings(data_dir=data_dir)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        _fail(f"TOLLWAY_{where.upper()}: {first['msg']}", 2)


def _safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message; never let it hide the real error
        return "<the configured database>"


def _run(settings: Settings, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `work` in an event loop; turn expected failures into one-line errors."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    from tollway.admin.token import AdminTokenError
    from tollway.identity.apikeys import PepperError
    from tollway.identity.errors import IdentityError
    from tollway.storage.database import default_url

    try:
        return asyncio.run(work())
    except IdentityError as exc:
        where = f" ({exc.field})" if exc.field and exc.field not in exc.message else ""
        _fail(f"{exc.message}{where}")
    except (CliError, AdminTokenError, PepperError) as exc:
        _fail(str(exc))
    except (OperationalError, DBAPIError, OSError) as exc:
        url = _safe_url(settings.database_url or str(default_url(settings.data_dir)))
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _fail(f"cannot use the database at {url}: {reason}")


@dataclass(slots=True)
class Db:
    settings: Settings
    database: Database

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        async with self.database.sessions() as session:
            yield session

    async def commit_and_announce(self, session: AsyncSession) -> None:
        """Commit, then tell running gateways (Redis, when configured) to forget
        the changed keys and users. The outbox rows committed with the change make
        gateways notice within a second even when this message is lost."""
        from tollway.identity.changes import pending_changes
        from tollway.identity.invalidation import Announcer

        changes = list(pending_changes(session))
        await session.commit()
        if not changes or not self.settings.redis_url:
            return
        redis = _redis(self.settings.redis_url)
        try:
            sent = await Announcer(redis).announce(changes)
        finally:
            await redis.aclose()
        if sent == 0:
            _warn(
                "could not notify gateways through Redis; they pick the change up from "
                "the database instead (within a second)"
            )

    async def pepper(self) -> bytes:
        """The key pepper, checked against the one this database's keys were made with."""
        from tollway.identity.apikeys import PEPPER_FILE, load_pepper
        from tollway.identity.pepper import verify_pepper

        configured = self.settings.key_pepper
        path = Path(self.settings.data_dir) / PEPPER_FILE
        existed = path.exists()
        pepper = load_pepper(configured.get_secret_value() if configured else None,
                             self.settings.data_dir)
        if configured is None and not existed and not self.database.is_sqlite:
            # With a shared database, a pepper made here and not given to the gateways
            # makes keys they can never verify.
            _warn(
                f"generated a new key pepper in {path}; gateways using this database must "
                "use the same pepper (TOLLWAY_KEY_PEPPER or this file), or keys created "
                "here will not authenticate"
            )
        await verify_pepper(self.database, pepper)
        return pepper


def _redis(url: str) -> Redis:
    from redis.asyncio import Redis

    # Short timeouts: a CLI command must not hang on a Redis that does not answer.
    return Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[Db]:
    from tollway.runtime import database_for
    from tollway.storage.migrate import upgrade

    database = database_for(settings)
    try:
        await upgrade(database)
        yield Db(settings, database)
    finally:
        await database.dispose()


def _parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def _user(session: AsyncSession, ref: str) -> Consumer:
    """A user by id or by email."""
    from tollway.identity import consumers

    ident = _parse_uuid(ref)
    if ident is not None:
        return await consumers.get_consumer(session, ident)
    if "@" not in ref:
        raise CliError(f"{ref!r} is neither a user id (UUID) nor an email")
    return await consumers.get_by_email(session, ref)


def _key_id(value: str) -> uuid.UUID:
    ident = _parse_uuid(value)
    if ident is None:
        _fail(f"{value!r} is not a key id (a UUID; `tollway keys list` shows them)")
    return ident


_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """"90" (seconds), "30s", "15m", "24h", "7d", "2w"."""
    match = _DURATION_RE.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not a duration (like 30s, 15m, 24h, 7d)")
    try:
        return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])
    except OverflowError:
        raise ValueError(f"{text!r} is too long a duration") from None


def parse_when(text: str, *, past: bool) -> datetime:
    """An ISO 8601 date or time (UTC when it has no offset), or a duration from now
    ("7d": seven days ago when `past`, seven days ahead otherwise)."""
    if _DURATION_RE.match(text.lower()) and not text.strip().isdigit():
        delta = parse_duration(text)
        now = datetime.now(UTC)
        try:
            return now - delta if past else now + delta
        except OverflowError:
            raise ValueError(f"{text!r} reaches past the calendar's range") from None
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        try:
            value = datetime.combine(date.fromisoformat(text.strip()), datetime.min.time())
        except ValueError:
            raise ValueError(
                f"{text!r} is neither an ISO 8601 time (2025-01-31T12:00:00Z) "
                "nor a duration (7d, 24h)"
            ) from None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        raise ValueError(f"{text!r} is out of range once converted to UTC") from None


def _when_option(value: str | None, *, past: bool, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value, past=past)
    except ValueError as exc:
        _fail(f"{flag}: {exc}", 2)


def _fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _fmt_day(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d")


def _print_json(value: BaseModel | dict[str, Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    typer.echo(json.dumps(data, indent=2))


# Columns that must come out whole, or nobody can paste them.
_WHOLE = {"id": 36, "user": 36, "key id": 36, "prefix": 17}


@contextmanager
def _table(title: str | None, *columns: str) -> Iterator[Table]:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        width = _WHOLE.get(column)
        table.add_column(column, no_wrap=width is not None, min_width=width)
    yield table
    _out().print(table)


def _record(title: str, fields: list[tuple[str, str]]) -> None:
    """One record, a field per line: never squeezed, whatever the terminal's width."""
    out = _out()
    out.print(Text(title, style="bold"), soft_wrap=True)
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.print(Text.assemble((f"  {name:<{width}}  ", "dim"), value), soft_wrap=True)


def _user_fields(c: Consumer) -> list[tuple[str, str]]:
    return [
        ("id", str(c.id)),
        ("email", c.email),
        ("name", c.name or "-"),
        ("status", c.status),
        ("plan", c.plan or "-"),
        ("created", _fmt_time(c.created_at)),
    ]


def _user_table(items: list[Consumer]) -> None:
    with _table(None, "id", "email", "name", "status", "plan", "created") as table:
        for c in items:
            table.add_row(
                str(c.id), c.email, c.name or "-", c.status, c.plan or "-", _fmt_day(c.created_at)
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
        ("expires", _fmt_time(k.expires_at)),
        ("last used", _fmt_time(k.last_used_at)),
        ("created", _fmt_time(k.created_at)),
    ]


def _key_table(items: list[ApiKey], emails: dict[uuid.UUID, str]) -> None:
    columns = ("id", "prefix", "status", "email", "name", "limits", "expires", "last used")
    with _table(None, *columns) as table:
        for k in items:
            table.add_row(
                str(k.id),
                k.prefix + "…",
                k.status,
                emails.get(k.consumer_id, str(k.consumer_id)),
                k.name or "-",
                _limits(k),
                _fmt_day(k.expires_at),
                _fmt_day(k.last_used_at),
            )


def _show_raw_key(raw: str, headline: str) -> None:
    """The raw key, on a line of its own, never wrapped or cut: shown only now."""
    err = _err()
    err.print(Text(headline, style="bold green"), soft_wrap=True)
    err.print(
        Text("Store it now: Tollway keeps only its hash and cannot show it again.", style="bold"),
        soft_wrap=True,
    )
    # stdout, alone on its line, so `KEY=$(tollway keys create ... | tail -n1)` works.
    typer.echo(raw)


def _next_page_hint(cursor: str | None, command: str) -> None:
    if cursor:
        _err().print(Text(f"more: {command} --cursor {cursor}", style="dim"), soft_wrap=True)


# ---------------------------------------------------------------- options

DataDirOpt = Annotated[
    Path | None, typer.Option(help="state directory (env TOLLWAY_DATA_DIR, default ./data)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
LimitOpt = Annotated[int, typer.Option(min=1, max=200, help="page size")]
CursorOpt = Annotated[str | None, typer.Option(help="continue a listing where it stopped")]


# ---------------------------------------------------------------- migrate


def migrate(
    check: Annotated[
        bool, typer.Option("--check", help="only check; exit 1 when the database is behind")
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Bring the database schema up to date (the server also does this at start)."""
    from tollway.runtime import database_for
    from tollway.storage import migrate as migrations
    from tollway.storage.database import default_url

    settings = _settings(data_dir)

    async def work() -> tuple[bool, str | None, str]:
        database = database_for(settings)
        try:
            if not check:
                await migrations.upgrade(database)
            current = await migrations.current_revision(database)
            is_current = await migrations.is_current(database)
            return is_current, current, migrations.head_revision()
        finally:
            await database.dispose()

    is_current, current, head = _run(settings, work)
    url = _safe_url(settings.database_url or default_url(settings.data_dir))
    if is_current:
        typer.echo(f"{url}: up to date (revision {head})")
        return
    where = f"at revision {current}" if current else "not initialized"
    _fail(f"{url} is behind: {where}, head is {head}; run `tollway migrate`")


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

    settings = _settings(data_dir)

    async def work() -> tuple[Consumer, bool]:
        async with _database(settings) as db, db.session() as session:
            consumer, created = await consumers.create_or_get(
                session, email=email, name=name, plan=plan
            )
            if created and plan is not None:
                await plans.require_plan(session, plan)  # no user with an unknown plan
            await db.commit_and_announce(session)
            return consumer, created

    consumer, created = _run(settings, work)
    if as_json:
        _print_json({**UserOut.of(consumer).model_dump(mode="json"), "created": created})
        return
    _record("created user" if created else "a user with this email exists",
            _user_fields(consumer))


@users_app.command("list")
def users_list(
    status: Annotated[
        str | None, typer.Option(help="active or disabled")
    ] = None,
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

    settings = _settings(data_dir)

    async def work() -> Page[Consumer]:
        async with _database(settings) as db, db.session() as session:
            return await consumers.list_consumers(
                session, email=email, status=status, cursor=cursor, limit=limit
            )

    page = _run(settings, work)
    if as_json:
        _print_json(
            UserList(items=[UserOut.of(c) for c in page.items], next_cursor=page.next_cursor)
        )
        return
    _user_table(page.items)
    _next_page_hint(page.next_cursor, "tollway users list")


@users_app.command("disable")
def users_disable(
    user: Annotated[str, typer.Argument(help="user id or email")],
    as_json: JsonOpt = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Disable a user and revoke all their keys (records and usage history stay)."""
    from tollway.admin.schemas import UserOut
    from tollway.identity import consumers

    settings = _settings(data_dir)

    async def work() -> tuple[Consumer, int]:
        from sqlalchemy import func, select

        from tollway.storage.models import ApiKey

        async with _database(settings) as db, db.session() as session:
            consumer = await _user(session, user)
            live = await session.scalar(
                select(func.count()).where(
                    ApiKey.consumer_id == consumer.id, ApiKey.status != "revoked"
                )
            )
            consumer = await consumers.disable_consumer(session, consumer.id)
            await db.commit_and_announce(session)
            return consumer, int(live or 0)

    consumer, revoked = _run(settings, work)
    if as_json:
        _print_json(UserOut.of(consumer))
        return
    typer.echo(f"disabled {consumer.email} ({consumer.id}); revoked {revoked} key(s)")


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

    settings = _settings(data_dir)
    expires_at = _when_option(expires, past=False, flag="--expires")

    async def work() -> tuple[NewKey, str]:
        async with _database(settings) as db, db.session() as session:
            consumer = await _user(session, user)
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

    new, email = _run(settings, work)
    if as_json:
        _print_json(KeyCreated(**KeyOut.fields_of(new.key), key=new.raw))
        return
    _record(f"created key for {email}", _key_fields(new.key, email))
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

    settings = _settings(data_dir)

    async def work() -> tuple[Page[ApiKey], dict[uuid.UUID, str]]:
        from sqlalchemy import select

        from tollway.storage.models import Consumer

        async with _database(settings) as db, db.session() as session:
            consumer_id = (await _user(session, user)).id if user else None
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

    page, emails = _run(settings, work)
    if as_json:
        _print_json(KeyList(items=[KeyOut.of(k) for k in page.items], next_cursor=page.next_cursor))
        return
    _key_table(page.items, emails)
    _next_page_hint(page.next_cursor, "tollway keys list")


def _set_key_status(key_id: str, status: Literal["active", "disabled"], data_dir: Path | None,
                    as_json: bool) -> None:
    from tollway.admin.schemas import KeyOut
    from tollway.identity import keys

    settings = _settings(data_dir)
    ident = _key_id(key_id)

    async def work() -> ApiKey:
        async with _database(settings) as db, db.session() as session:
            key = await keys.update_key(session, ident, status=status)
            await db.commit_and_announce(session)
            return key

    key = _run(settings, work)
    if as_json:
        _print_json(KeyOut.of(key))
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

    settings = _settings(data_dir)
    ident = _key_id(key_id)

    async def work() -> ApiKey:
        async with _database(settings) as db, db.session() as session:
            key = await keys.revoke_key(session, ident)
            await db.commit_and_announce(session)
            return key

    key = _run(settings, work)
    if as_json:
        _print_json(KeyOut.of(key))
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

    settings = _settings(data_dir)
    ident = _key_id(key_id)
    try:
        grace_delta = parse_duration(grace)
    except ValueError as exc:
        _fail(f"--grace: {exc}", 2)

    async def work() -> tuple[NewKey, datetime | None]:
        async with _database(settings) as db, db.session() as session:
            pepper = await db.pepper()
            new = await keys.rotate_key(session, pepper, ident, grace=grace_delta)
            previous = await previous_secret_expiry(session, ident, hash_key(pepper, new.raw))
            await db.commit_and_announce(session)
            return new, previous

    new, previous = _run(settings, work)
    if as_json:
        _print_json(
            KeyRotated(**KeyOut.fields_of(new.key), key=new.raw, previous_expires_at=previous)
        )
        return
    until = f"the previous secret works until {_fmt_time(previous)}" if previous else (
        "there was no previous secret"
    )
    _show_raw_key(new.raw, f"new secret for key {new.key.id} ({until}):")


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

    settings = _settings(data_dir)
    ident = _key_id(key_id)
    if group_by not in ("hour", "day"):
        _fail(f"--group-by: {group_by!r} is not hour or day", 2)
    grouping: Literal["hour", "day"] = "day" if group_by == "day" else "hour"
    from tollway.identity.errors import InvalidInput

    try:
        window_start, window_end = default_window(
            _when_option(start, past=True, flag="--from"),
            _when_option(end, past=True, flag="--to"),
            grouping,
        )
    except InvalidInput as exc:
        _fail(f"--{exc.field}: {exc.message}", 2)
    if window_start >= window_end:
        _fail("--from must be before --to", 2)

    async def work() -> UsageOut:
        from tollway.usage.stats import usage_report

        async with _database(settings) as db, db.session() as session:
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
                report, key_id=key.id, user_id=None, route=None,
                start=window_start, end=window_end, group_by=grouping,
            )

    out = _run(settings, work)
    if as_json:
        _print_json(out)
        return
    _print_usage(out, recent)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} ms"


def _print_usage(out: Any, recent: int) -> None:
    console = _out()
    t = out.totals
    console.print(
        Text.assemble(
            ("usage of key ", "bold"), str(out.key_id), " from ", _fmt_time(out.start),
            " to ", _fmt_time(out.end),
        ),
        soft_wrap=True,
    )
    with _table("totals", "requests", "errors", "error rate", "p50", "p95", "avg", "in",
                "out") as table:
        table.add_row(
            str(t.requests), str(t.errors), f"{t.error_rate:.2%}", _ms(t.latency_ms_p50),
            _ms(t.latency_ms_p95), _ms(t.latency_ms_avg), f"{t.bytes_in} B", f"{t.bytes_out} B",
        )
    if out.series:
        with _table(f"per {out.group_by}", out.group_by, "requests", "errors", "p50",
                    "p95") as table:
            for row in out.series:
                table.add_row(_fmt_time(row.period), str(row.requests), str(row.errors),
                              _ms(row.latency_ms_p50), _ms(row.latency_ms_p95))
    if out.top_routes:
        with _table("top routes", "route", "requests") as table:
            for route in out.top_routes:
                table.add_row(route.route or "-", str(route.requests))
    if recent and out.recent.items:
        with _table("recent requests", "time", "method", "path", "status", "latency",
                    "request id") as table:
            for r in out.recent.items[:recent]:
                table.add_row(_fmt_time(r.ts), r.method, r.path, str(r.status),
                              _ms(r.latency_ms), r.request_id or "-")


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

    settings = _settings(data_dir)
    try:
        windows = [parse_window(w) for w in window or []]
    except ValueError as exc:
        _fail(f"--window: {exc}", 2)

    async def work() -> PlanRow:
        async with _database(settings) as db, db.session() as session:
            row = await plans.create_plan(
                session, name=name, limits=windows, description=description
            )
            await db.commit_and_announce(session)
            return row

    row = _run(settings, work)
    if as_json:
        _print_json(PlanOut.of(row))
        return
    fields = [("name", row.name), ("limits", _plan_windows(row))]
    _record("created plan", [*fields, ("description", row.description or "-")])


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

    settings = _settings(data_dir)

    async def work() -> tuple[Page[PlanRow], dict[str, int]]:
        async with _database(settings) as db, db.session() as session:
            page = await plans.list_plans(session, cursor=cursor, limit=limit)
            users = {p.name: await plans.users_of(session, p.name) for p in page.items}
            return page, users

    page, users = _run(settings, work)
    if as_json:
        _print_json(
            PlanList(items=[PlanOut.of(p) for p in page.items], next_cursor=page.next_cursor)
        )
        return
    with _table(None, "name", "limits", "users", "description") as table:
        for p in page.items:
            table.add_row(p.name, _plan_windows(p), str(users[p.name]), p.description or "-")
    _next_page_hint(page.next_cursor, "tollway plans list")


@plans_app.command("delete")
def plans_delete(
    name: Annotated[str, typer.Argument(help="the plan's name")],
    data_dir: DataDirOpt = None,
) -> None:
    """Delete a plan that no user has."""
    from tollway.identity import plans

    settings = _settings(data_dir)

    async def work() -> None:
        async with _database(settings) as db, db.session() as session:
            await plans.delete_plan(session, name)
            await db.commit_and_announce(session)

    _run(settings, work)
    typer.echo(f"deleted plan {name}")


# ---------------------------------------------------------------- admin-token


def admin_token(data_dir: DataDirOpt = None) -> None:
    """Print the admin API's token (and, on stderr, where it comes from)."""
    from tollway.admin.token import AdminTokenError, load_admin_token

    settings = _settings(data_dir)
    try:
        token = load_admin_token(settings)
    except (AdminTokenError, OSError) as exc:
        _fail(str(exc))
    if token.path is None:
        _err().print("admin token from TOLLWAY_ADMIN_TOKEN", soft_wrap=True)
    elif token.generated:
        _err().print(f"generated a new admin token into {token.path} (mode 0600)", soft_wrap=True)
    else:
        _err().print(f"admin token stored in {token.path}", soft_wrap=True)
    typer.echo(token.value)
    sys.stdout.flush()
