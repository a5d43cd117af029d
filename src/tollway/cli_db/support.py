"""What every database command shares: consoles and one-line errors, settings,
the database (migrated first) and its Redis announcements, parsing of ids, times
and durations, tables and records, and the common options."""

from __future__ import annotations

import asyncio
import json
import os
import re
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn, TypeVar

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
    from tollway.storage.models import Consumer


T = TypeVar("T")

# ---------------------------------------------------------------- plumbing


# Output that goes to a file or a pipe is not cut to 80 columns: nobody's screen
# is there to fit, and a cut id cannot be pasted.
PIPED_WIDTH = 200


def stdout_console() -> Console:
    # Made per command, not at import: the width (COLUMNS) is read when it is made.
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(highlight=False, width=PIPED_WIDTH)
    return console


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False)


class CliError(Exception):
    """A failure to report on one line and exit 1."""


def fail(message: str, code: int = 1) -> NoReturn:
    stderr_console().print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str) -> None:
    stderr_console().print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def load_settings(data_dir: Path | None) -> Settings:
    try:
        return Settings() if data_dir is None else Settings(data_dir=data_dir)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        fail(f"TOLLWAY_{where.upper()}: {first['msg']}", 2)


def safe_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - only for a message; never let it hide the real error
        return "<the configured database>"


def run(settings: Settings, work: Callable[[], Coroutine[Any, Any, T]]) -> T:
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
        fail(f"{exc.message}{where}")
    except (CliError, AdminTokenError, PepperError) as exc:
        fail(str(exc))
    except (OperationalError, DBAPIError, OSError) as exc:
        url = safe_url(settings.database_url or str(default_url(settings.data_dir)))
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        fail(f"cannot use the database at {url}: {reason}")


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
        redis = redis_client(self.settings.redis_url)
        try:
            sent = await Announcer(redis).announce(changes)
        finally:
            await redis.aclose()
        if sent == 0:
            warn(
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
        pepper = load_pepper(
            configured.get_secret_value() if configured else None, self.settings.data_dir
        )
        if configured is None and not existed and not self.database.is_sqlite:
            # With a shared database, a pepper made here and not given to the gateways
            # makes keys they can never verify.
            warn(
                f"generated a new key pepper in {path}; gateways using this database must "
                "use the same pepper (TOLLWAY_KEY_PEPPER or this file), or keys created "
                "here will not authenticate"
            )
        await verify_pepper(self.database, pepper)
        return pepper


def redis_client(url: str) -> Redis:
    from redis.asyncio import Redis

    # Short timeouts: a CLI command must not hang on a Redis that does not answer.
    return Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)


@asynccontextmanager
async def open_database(settings: Settings) -> AsyncIterator[Db]:
    from tollway.runtime import database_for
    from tollway.storage.migrate import upgrade

    database = database_for(settings)
    try:
        await upgrade(database)
        yield Db(settings, database)
    finally:
        await database.dispose()


def parse_uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


async def find_user(session: AsyncSession, ref: str) -> Consumer:
    """A user by id or by email."""
    from tollway.identity import consumers

    ident = parse_uuid(ref)
    if ident is not None:
        return await consumers.get_consumer(session, ident)
    if "@" not in ref:
        raise CliError(f"{ref!r} is neither a user id (UUID) nor an email")
    return await consumers.get_by_email(session, ref)


def parse_key_id(value: str) -> uuid.UUID:
    ident = parse_uuid(value)
    if ident is None:
        fail(f"{value!r} is not a key id (a UUID; `tollway keys list` shows them)")
    return ident


_DURATION_RE = re.compile(r"^\s*(\d+)\s*([smhdw]?)\s*$")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> timedelta:
    """ "90" (seconds), "30s", "15m", "24h", "7d", "2w"."""
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


def when_option(value: str | None, *, past: bool, flag: str) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_when(value, past=past)
    except ValueError as exc:
        fail(f"{flag}: {exc}", 2)


def fmt_time(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def fmt_day(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d")


def print_json(value: BaseModel | dict[str, Any]) -> None:
    data = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
    typer.echo(json.dumps(data, indent=2))


# Columns that must come out whole, or nobody can paste them.
_WHOLE = {"id": 36, "user": 36, "key id": 36, "prefix": 17}


@contextmanager
def print_table(title: str | None, *columns: str) -> Iterator[Table]:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        width = _WHOLE.get(column)
        table.add_column(column, no_wrap=width is not None, min_width=width)
    yield table
    stdout_console().print(table)


def print_record(title: str, fields: list[tuple[str, str]]) -> None:
    """One record, a field per line: never squeezed, whatever the terminal's width."""
    out = stdout_console()
    out.print(Text(title, style="bold"), soft_wrap=True)
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        out.print(Text.assemble((f"  {name:<{width}}  ", "dim"), value), soft_wrap=True)


def next_page_hint(cursor: str | None, command: str) -> None:
    if cursor:
        stderr_console().print(
            Text(f"more: {command} --cursor {cursor}", style="dim"), soft_wrap=True
        )


# ---------------------------------------------------------------- options

DataDirOpt = Annotated[
    Path | None, typer.Option(help="state directory (env TOLLWAY_DATA_DIR, default ./data)")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable output")]
LimitOpt = Annotated[int, typer.Option(min=1, max=200, help="page size")]
CursorOpt = Annotated[str | None, typer.Option(help="continue a listing where it stopped")]
