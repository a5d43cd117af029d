"""`RedisBans`: the ban store shared by every process and node. How it keeps bans in
Redis, and why the request path never waits on Redis: limits/bans.py's docstring."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

from tollway.limits.bans import (
    KINDS,
    MAX_ENTRIES,
    PREFIX,
    Ban,
    BanPolicy,
    BanStore,
    BanStoreUnavailable,
    Key,
    bounded_put,
    check_kind,
)
from tollway.limits.breaker import StoreBreaker
from tollway.storage.redis_pubsub import listen

if TYPE_CHECKING:
    from redis.asyncio import Redis


log = structlog.get_logger("tollway.bans")
T = TypeVar("T")

# KEYS: ban, count, strikes, index. ARGV: n, window_ms, threshold, base_ms, growth,
# max_ms, repeat_ms, kind, value, channel, reason.
# Returns {count, ban JSON}: count -1 with the ban when the source is banned
# already (not counted), {count, ""} below the threshold.
FAIL_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local existing = redis.call('GET', KEYS[1])
if existing then return {-1, existing} end
local n = tonumber(ARGV[1])
local c = redis.call('INCRBY', KEYS[2], n)
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
if c < tonumber(ARGV[3]) then return {c, ''} end
redis.call('DEL', KEYS[2])
local strikes = redis.call('INCR', KEYS[3])
redis.call('PEXPIRE', KEYS[3], ARGV[7])
local exponent = math.min(strikes - 1, 64)
local ms = math.floor(math.min(tonumber(ARGV[6]), tonumber(ARGV[4]) * tonumber(ARGV[5]) ^ exponent))
if ms < 1 then ms = 1 end
local ban = cjson.encode({kind = ARGV[8], value = ARGV[9], reason = ARGV[11],
  until_ms = now + ms, created_ms = now, strikes = strikes})
redis.call('SET', KEYS[1], ban, 'PX', ms)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
redis.call('ZADD', KEYS[4], now + ms, ARGV[9])
redis.call('PUBLISH', ARGV[10], '{"op":"ban","ban":' .. ban .. '}')
return {c, ban}
"""

# KEYS: ban, count, index. ARGV: ms, kind, value, reason, channel. Returns the ban.
BAN_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
local ban = cjson.encode({kind = ARGV[2], value = ARGV[3], reason = ARGV[4],
  until_ms = now + ms, created_ms = now, strikes = 0})
redis.call('SET', KEYS[1], ban, 'PX', ms)
redis.call('DEL', KEYS[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
redis.call('ZADD', KEYS[3], now + ms, ARGV[3])
redis.call('PUBLISH', ARGV[5], '{"op":"ban","ban":' .. ban .. '}')
return ban
"""

# KEYS: ban, count, strikes, index. ARGV: kind, value, channel. Returns 1 if a ban ended.
LIFT_LUA = """
local existed = redis.call('DEL', KEYS[1])
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[2])
if existed == 1 then
  redis.call('PUBLISH', ARGV[3], cjson.encode({op = 'lift', kind = ARGV[1], value = ARGV[2]}))
end
return existed
"""

# Failures sent per pipeline (one round trip each).
FLUSH_CHUNK = 500
CONNECT_TIMEOUT = 5.0


class RedisBans(BanStore):
    """Bans shared through Redis; see the module docstring."""

    shared = True

    def __init__(
        self,
        redis: Redis,
        *,
        subscriber: Redis | None = None,
        prefix: str = PREFIX,
        timeout: float = 0.25,
        admin_timeout: float = 2.0,
        refresh_interval: float = 2.0,
        resync_interval: float = 30.0,
        breaker: StoreBreaker | None = None,
        clock: Callable[[], float] = time.time,
        max_entries: int = MAX_ENTRIES,
        own_clients: bool = False,
    ) -> None:
        super().__init__(clock=clock, max_entries=max_entries)
        self.redis = redis
        self.subscriber = subscriber or redis
        self.prefix = prefix
        self.channel = f"{prefix}bans"
        self.timeout = timeout
        self.admin_timeout = admin_timeout
        # Full reloads: every refresh_interval without a live subscription, every
        # resync_interval with one (then only a safety net).
        self.refresh_interval = refresh_interval
        self.resync_interval = resync_interval
        self.breaker = breaker or StoreBreaker()
        self._own_clients = own_clients
        # Here rather than at the top: redis-py costs a gateway without Redis about
        # 16 MB of RSS, and only a Redis ban store needs its exceptions.
        from redis.exceptions import NoScriptError, RedisError

        self._no_script: type[Exception] = NoScriptError
        self._redis_error: type[Exception] = RedisError
        self._fail_script = redis.register_script(FAIL_LUA)
        self._ban_script = redis.register_script(BAN_LUA)
        self._lift_script = redis.register_script(LIFT_LUA)
        # (kind, value, policy) -> failures not yet sent.
        self._pending: dict[tuple[str, str, BanPolicy], int] = {}
        self._wake = asyncio.Event()
        # Sources a message or a local change touched, and when (monotonic): a reload
        # that started before that keeps what the message said.
        self._touched: dict[Key, float] = {}
        self.subscribed = False
        self.messages = 0
        self.reloads = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.25, **kwargs: Any) -> RedisBans:
        """With clients of its own: short socket timeouts for commands; the
        subscription's connection waits on messages, so it gets only a connect timeout."""
        from redis.asyncio import Redis

        commands = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        subscriber = Redis.from_url(url, socket_connect_timeout=CONNECT_TIMEOUT)
        return cls(commands, subscriber=subscriber, timeout=timeout, own_clients=True, **kwargs)

    # ---- keys ---------------------------------------------------------------------

    def ban_key(self, kind: str, value: str) -> str:
        return f"{self.prefix}ban:{kind}:{value}"

    def count_key(self, kind: str, value: str) -> str:
        return f"{self.prefix}abuse:count:{kind}:{value}"

    def strikes_key(self, kind: str, value: str) -> str:
        return f"{self.prefix}abuse:strikes:{kind}:{value}"

    def index_key(self, kind: str) -> str:
        return f"{self.prefix}bans:{kind}"

    # ---- hot path -----------------------------------------------------------------

    def failed(self, kind: str, value: str, policy: BanPolicy) -> None:
        key = (kind, value, policy)
        pending = self._pending
        if key in pending:
            pending[key] += 1
        elif len(pending) >= self.max_entries:
            self.stats.dropped += 1
            return
        else:
            pending[key] = 1
        self._wake.set()

    # ---- calls to Redis -----------------------------------------------------------

    async def _call(self, fn: Callable[[], Awaitable[T]], budget: float) -> T:
        if not self.breaker.allow():
            raise BanStoreUnavailable("the ban store (Redis) is failing; not asked for now")
        try:
            async with asyncio.timeout(budget):
                result = await fn()
        except (self._redis_error, OSError, TimeoutError) as exc:
            self.breaker.failure()
            self.stats.store_errors += 1
            if self.stats.store_errors == 1 or self.stats.store_errors % 100 == 0:
                log.warning(
                    "ban store call failed",
                    error=f"{type(exc).__name__}: {exc}",
                    failures=self.stats.store_errors,
                )
            raise BanStoreUnavailable(f"{type(exc).__name__}: {exc}") from exc
        self.breaker.success()
        return result

    def _fail_args(self, kind: str, value: str, policy: BanPolicy, n: int) -> list[Any]:
        return [
            self.ban_key(kind, value),
            self.count_key(kind, value),
            self.strikes_key(kind, value),
            self.index_key(kind),
            n,
            max(1, round(policy.window * 1000)),
            policy.threshold,
            max(1, round(policy.ban_seconds * 1000)),
            policy.growth,
            max(1, round(policy.max_ban_seconds * 1000)),
            max(1, round(policy.repeat_window * 1000)),
            kind,
            value,
            self.channel,
            policy.reason(),
        ]

    def _after_fail(self, kind: str, reply: Any) -> Ban | None:
        count, data = int(reply[0]), reply[1]
        if not data:
            return None
        ban = Ban.decode(data)
        if ban is None:
            return None
        self._remember_touched(ban)
        if count >= 0:  # -1: banned already, not a new ban
            self.stats.bans[kind] += 1
            return ban
        return None

    async def record_failure(
        self, kind: str, value: str, policy: BanPolicy, count: int = 1
    ) -> Ban | None:
        args = self._fail_args(kind, value, policy, count)

        async def run() -> Any:
            return await self._fail_script(keys=args[:4], args=args[4:])

        return self._after_fail(kind, await self._call(run, self.timeout))

    async def flush(self) -> int:
        """Send the queued failures (one pipeline per chunk); returns how many bans
        they caused. Failures that cannot be sent are dropped: fail open."""
        batch, self._pending = self._pending, {}
        items = list(batch.items())
        bans = 0
        for start in range(0, len(items), FLUSH_CHUNK):
            chunk = items[start : start + FLUSH_CHUNK]
            try:
                replies = await self._call(partial(self._send, chunk), self.timeout)
            except BanStoreUnavailable:
                self.stats.dropped += sum(n for _, n in items[start:])
                break
            for ((kind, _value, _policy), _n), reply in zip(chunk, replies, strict=True):
                if isinstance(reply, Exception):
                    self.stats.store_errors += 1
                    continue
                if self._after_fail(kind, reply) is not None:
                    bans += 1
        return bans

    async def _send(self, chunk: list[tuple[tuple[str, str, BanPolicy], int]]) -> list[Any]:
        """EVALSHA for each failure in one pipeline; on NOSCRIPT (a restarted or
        flushed Redis) load the script and resend the ones that missed, once."""
        sha = self._fail_script.sha
        args = [self._fail_args(k, v, p, n) for (k, v, p), n in chunk]
        replies: list[Any] = await self._pipeline_evalsha(sha, args)
        missed = [i for i, r in enumerate(replies) if isinstance(r, self._no_script)]
        if missed:
            sha = self._fail_script.sha = await self.redis.script_load(FAIL_LUA)
            again = await self._pipeline_evalsha(sha, [args[i] for i in missed])
            for i, reply in zip(missed, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipeline_evalsha(self, sha: str, calls: list[list[Any]]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for call in calls:
                pipe.evalsha(sha, 4, *call)
            result: list[Any] = await pipe.execute(raise_on_error=False)
        return result

    async def ban(self, kind: str, value: str, seconds: float, reason: str) -> Ban:
        check_kind(kind)
        keys = [self.ban_key(kind, value), self.count_key(kind, value), self.index_key(kind)]
        args: list[str | int] = [max(1, round(seconds * 1000)), kind, value, reason, self.channel]

        async def run() -> Any:
            return await self._ban_script(keys=keys, args=args)

        ban = Ban.decode(await self._call(run, self.admin_timeout))
        if ban is None:
            raise BanStoreUnavailable("the ban store answered with an unreadable ban")
        self._remember_touched(ban)
        self.stats.bans[kind] += 1
        return ban

    async def lift(self, kind: str, value: str) -> bool:
        keys = [
            self.ban_key(kind, value),
            self.count_key(kind, value),
            self.strikes_key(kind, value),
            self.index_key(kind),
        ]

        async def run() -> Any:
            return await self._lift_script(keys=keys, args=[kind, value, self.channel])

        existed = int(await self._call(run, self.admin_timeout)) == 1
        self._forget_touched(kind, value)
        return existed

    async def list_bans(
        self, kind: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Ban]:
        kinds = KINDS if kind is None else (kind,)

        async def run() -> list[Ban]:
            return await self._read(kinds, offset + limit)

        bans = await self._call(run, self.admin_timeout)
        return bans[offset : offset + limit]

    async def _read(self, kinds: tuple[str, ...], count: int) -> list[Ban]:
        """Up to `count` active bans of `kinds` (per kind), soonest to end first.

        Index members whose ban key is gone (lifted elsewhere, expired) are skipped;
        those past their end are pruned on the way.
        """
        now_ms = round(self.clock() * 1000)
        async with self.redis.pipeline(transaction=False) as pipe:
            for k in kinds:
                pipe.zremrangebyscore(self.index_key(k), "-inf", now_ms)
                pipe.zrangebyscore(self.index_key(k), now_ms, "+inf", start=0, num=count)
            replies = await pipe.execute()
        keys: list[str] = []
        for i, k in enumerate(kinds):
            for member in replies[2 * i + 1]:
                value = member.decode() if isinstance(member, bytes) else str(member)
                keys.append(self.ban_key(k, value))
        bans: list[Ban] = []
        for start in range(0, len(keys), 1000):
            for data in await self.redis.mget(keys[start : start + 1000]):
                ban = Ban.decode(data) if data is not None else None
                if ban is not None and ban.until * 1000 > now_ms:
                    bans.append(ban)
        bans.sort(key=lambda b: (b.until, b.kind, b.value))
        return bans

    async def reload(self) -> int:
        """Replace the local table by what Redis holds; returns the number of bans."""
        started = time.monotonic()
        bans = await self._call(lambda: self._read(KINDS, self.max_entries), self.admin_timeout)
        fresh = {(b.kind, b.value): b for b in bans}
        # What a message or a local change said after this read began is newer.
        for key, at in self._touched.items():
            if at >= started:
                current = self.active.get(key)
                if current is None:
                    fresh.pop(key, None)
                else:
                    fresh[key] = current
        self._touched = {k: at for k, at in self._touched.items() if at >= started}
        self.active = fresh
        self.reloads += 1
        return len(fresh)

    def _remember_touched(self, ban: Ban) -> None:
        self._remember(ban)
        bounded_put(self._touched, (ban.kind, ban.value), time.monotonic(), self.max_entries)

    def _forget_touched(self, kind: str, value: str) -> None:
        self.active.pop((kind, value), None)
        bounded_put(self._touched, (kind, value), time.monotonic(), self.max_entries)

    def on_message(self, data: bytes | str) -> None:
        """Apply one `{prefix}bans` message; junk is ignored."""
        try:
            message = json.loads(data)
            op = message["op"]
        except (ValueError, TypeError, KeyError):
            return
        if op == "ban":
            ban = Ban.decode(message.get("ban"))
            if ban is not None:
                self._remember_touched(ban)
        elif op == "lift":
            kind, value = message.get("kind"), message.get("value")
            if isinstance(kind, str) and isinstance(value, str):
                self._forget_touched(kind, value)

    # ---- background work ----------------------------------------------------------

    async def start(self) -> None:
        """Load the active bans (a dead Redis is logged, not raised) and start the
        failure sender, the subscription and the periodic reload."""
        try:
            await self.reload()
        except BanStoreUnavailable as exc:
            log.warning("cannot load bans now; will retry", error=str(exc))
        self._tasks = [
            asyncio.create_task(self._flush_loop(), name="tollway-bans-flush"),
            asyncio.create_task(self._subscribe_loop(), name="tollway-bans-sub"),
            asyncio.create_task(self._reload_loop(), name="tollway-bans-reload"),
        ]

    async def aclose(self) -> None:
        """Stop the background work, send what is queued, close own clients; once."""
        if self._closing:
            return
        self._closing = True
        tasks, self._tasks = self._tasks, []
        # Cancelled until they end: redis-py's get_message can swallow a
        # cancellation that lands together with its own read timeout, and the loop
        # would then wait for the next one (seen with redis-py 8 on Python 3.11).
        while any(not t.done() for t in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # What is queued is sent once more, briefly: a clean stop loses nothing.
        if self._pending:
            with contextlib.suppress(BanStoreUnavailable):
                await self.flush()
        if self._own_clients:
            clients = (
                [self.redis] if self.subscriber is self.redis else [self.redis, self.subscriber]
            )
            for client in clients:
                with contextlib.suppress(Exception):  # closing: a dead Redis is no news
                    await client.aclose()

    async def _flush_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # a bug here must not stop counting for good
                log.exception("ban flush failed")

    async def _reload_loop(self) -> None:
        while True:
            await asyncio.sleep(self.resync_interval if self.subscribed else self.refresh_interval)
            with contextlib.suppress(BanStoreUnavailable):  # _call logged it
                await self.reload()

    async def _subscribe_loop(self) -> None:
        backoff = 0.5
        while not self._closing:
            pubsub = self.subscriber.pubsub()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await pubsub.subscribe(self.channel)
                    while (await pubsub.get_message(timeout=CONNECT_TIMEOUT)) is None:
                        pass
                self.subscribed = True
                backoff = 0.5
                # Whatever happened before the subscription took hold.
                with contextlib.suppress(BanStoreUnavailable):
                    await self.reload()
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except (self._redis_error, OSError, TimeoutError, ConnectionError) as exc:
                if self.subscribed:
                    log.warning("ban subscription lost", error=f"{type(exc).__name__}: {exc}")
            finally:
                self.subscribed = False
                with contextlib.suppress(Exception):  # closing a broken connection
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def _listen(self, pubsub: Any) -> None:
        await listen(pubsub, self._heard, lambda: not self._closing)

    def _heard(self, data: bytes) -> None:
        self.messages += 1
        self.on_message(data)
