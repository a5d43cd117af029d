"""What a gateway process holds beside its config: database, Redis, key cache, usage.

Plugins receive it through `Plugin.bind` when a snapshot is built for a running
gateway (never for `tollway check`), so that a plugin reaches shared services
without module globals. The parent of `--workers N` opens only the database (for the
admin API); data-plane processes also run the key resolver, the plan book and the
usage recorder.
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
from tollway.identity.plans import plan_book
from tollway.identity.resolver import KeyResolver
from tollway.settings import Settings
from tollway.storage.database import Database, default_url
from tollway.storage.migrate import upgrade
from tollway.usage.recorder import UsageRecorder

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from tollway.limits.bans import BanStore
    from tollway.limits.plans import PlanBook
    from tollway.limits.service import LimitService


@dataclass(slots=True)
class Runtime:
    settings: Settings
    database: Database
    pepper: bytes
    redis: Redis | None = None
    # Data-plane processes only.
    keys: KeyResolver | None = None
    usage: UsageRecorder | None = None
    # Every plan and live limit grant, kept current through the key resolver's
    # change feed (plan/grant changes reach it within a second on every node).
    plans: PlanBook | None = None
    # The rate limiter (memory, or Redis when configured): one per process, so
    # that counters outlive config reloads.
    limits: LimitService | None = None
    # abuse-detection bans: one store per process (the admin parent's too, for
    # /bans), so that bans outlive config reloads.
    bans: BanStore | None = None

    async def close(self, grace: float = 10.0) -> None:
        """Flush usage (up to `grace` seconds), stop background work, close connections."""
        if self.usage is not None:
            await self.usage.stop(grace)
        if self.plans is not None:
            if self.keys is not None:
                self.keys.remove_change_listener(self.plans.on_change, self.plans.on_reset)
            await self.plans.stop()
        if self.keys is not None:
            await self.keys.stop()
        if self.limits is not None:
            await self.limits.aclose()
        if self.bans is not None:
            await self.bans.aclose()
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


def open_limits(settings: Settings) -> LimitService:
    """The process's limiter: Redis (own client, short timeouts) when configured."""
    from tollway.limits.memory import MemoryLimiter
    from tollway.limits.service import LimitService

    redis_limiter = None
    if settings.redis_url:
        from tollway.limits.redis_store import RedisLimiter

        redis_limiter = RedisLimiter.from_url(settings.redis_url)
    return LimitService(MemoryLimiter(), redis_limiter)


def open_bans(settings: Settings) -> BanStore:
    """Abuse bans: shared through Redis when configured, else this process's own."""
    from tollway.limits.bans import MemoryBans
    from tollway.limits.redis_bans import RedisBans

    if settings.redis_url:
        return RedisBans.from_url(settings.redis_url)
    return MemoryBans()


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
    runtime.bans = open_bans(settings)
    await runtime.bans.start()  # never raises: a dead Redis is retried in the background
    if data_plane:
        try:
            runtime.keys = KeyResolver(database, pepper, settings, redis)
            await runtime.keys.start()
            runtime.plans = plan_book(database)
            # Listening before the first load: a change committed during it reloads.
            runtime.keys.add_change_listener(runtime.plans.on_change, runtime.plans.on_reset)
            await runtime.plans.start()
            runtime.usage = UsageRecorder(database, settings)
            runtime.usage.start()
            runtime.limits = open_limits(settings)
        except BaseException:
            await runtime.close(0)  # nothing half-open left behind
            raise
    return runtime
