"""What a gateway process holds beside its config: database, Redis, key cache, usage.

Plugins receive it through `Plugin.bind` when a snapshot is built for a running
gateway (never for `tollway check`), so that a plugin reaches shared services
without module globals. The parent of `--workers N` opens only the database (for the
admin API); data-plane processes also run the key resolver and the usage recorder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DBAPIError

from tollway.identity.apikeys import load_pepper
from tollway.identity.pepper import verify_pepper
from tollway.identity.resolver import KeyResolver
from tollway.settings import Settings
from tollway.storage.database import Database, default_url
from tollway.storage.migrate import upgrade
from tollway.usage.recorder import UsageRecorder

if TYPE_CHECKING:
    from redis.asyncio import Redis


@dataclass(slots=True)
class Runtime:
    settings: Settings
    database: Database
    pepper: bytes
    redis: Redis | None = None
    # Data-plane processes only.
    keys: KeyResolver | None = None
    usage: UsageRecorder | None = None

    async def close(self, grace: float = 10.0) -> None:
        """Flush usage (up to `grace` seconds), stop background work, close connections."""
        if self.usage is not None:
            await self.usage.stop(grace)
        if self.keys is not None:
            await self.keys.stop()
        if self.redis is not None:
            with contextlib.suppress(Exception):  # closing: a dead Redis is no news
                await self.redis.aclose()
        await self.database.dispose()


def database_for(settings: Settings) -> Database:
    return Database(settings.database_url or default_url(settings.data_dir))


class DatabaseUnavailable(RuntimeError):
    """The configured database cannot be reached or used; the message says which
    (its URL without the password) and why, on one line."""


def _safe_url(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<the configured database>"


@contextlib.contextmanager
def database_errors(settings: Settings) -> Iterator[None]:
    """Turn the driver's failures at start (refused, no such database, bad password)
    into DatabaseUnavailable, which `serve` prints on one line instead of a traceback."""
    try:
        yield
    except (DBAPIError, OSError) as exc:
        url = _safe_url(settings.database_url or default_url(settings.data_dir))
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise DatabaseUnavailable(
            f"cannot use the database at {url}: {reason[0] if reason else type(exc).__name__}"
        ) from exc


async def open_runtime(settings: Settings, *, data_plane: bool, migrate: bool) -> Runtime:
    """Open the database (migrating it when asked), Redis, and the data-plane services."""
    database = database_for(settings)
    pepper = load_pepper(
        settings.key_pepper.get_secret_value() if settings.key_pepper else None,
        settings.data_dir,
    )
    try:
        with database_errors(settings):
            if migrate:
                await upgrade(database)
            await verify_pepper(database, pepper)
    except BaseException:
        await database.dispose()
        raise
    redis: Redis | None = None
    if settings.redis_url:
        from redis.asyncio import Redis

        redis = Redis.from_url(settings.redis_url)
    runtime = Runtime(settings=settings, database=database, pepper=pepper, redis=redis)
    if data_plane:
        try:
            runtime.keys = KeyResolver(database, pepper, settings, redis)
            await runtime.keys.start()
            runtime.usage = UsageRecorder(database, settings)
            runtime.usage.start()
        except BaseException:
            await runtime.close(0)  # nothing half-open left behind
            raise
    return runtime
