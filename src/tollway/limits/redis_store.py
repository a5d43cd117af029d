"""RedisLimiter: the shared limit store, exact across workers and nodes.

Every check is ONE round trip: a Lua script (redis_scripts.CHECK) evaluates all
the windows of the request and writes all or none, with the same formulas as
the pure functions, so a check decides exactly what MemoryLimiter decides at the
same instant. Scripts run by EVALSHA with the SHA computed here; a server that
does not know the script yet (NOSCRIPT: restarted, failed over) gets SCRIPT LOAD
and one retry.

Time is Redis's clock (TIME inside the script), one clock for every node. Tests
may pass `now` instead, to compare with the pure functions on a fake clock.
Calendar windows (day, month in an IANA zone) need tz rules Lua does not have:
Python sends the bounds of the previous, current and next window around its own
clock, and the script takes the one that holds Redis's now; if none does (the
clocks are more than a window apart) it takes the closest. Second, minute and
hour windows are epoch multiples, computed in the script.

Keys: f"{prefix}{{{encoded key parts}}}:{slot id}". The key parts are encoded
collision-free (their count, then each prefixed by its UTF-8 length), so
("a:b",) and ("a", "b") never share a counter; the braces are a cluster hash tag
that puts every window of one key in one slot. The slot id is multi.slot_id, so
a raised allowance keeps its count. Every counter carries a TTL ending when its
state is as good as fresh; nothing lives forever.

The client is resp.RespClient (one pipelined connection; see there why not
redis-py). A check is on the path of every limited request, so what does not
change is encoded once: the spec of each limit sequence (a _Plan, kept on the
multi.Windows the plugin passes) and the Redis keys of each key (a bounded
cache); a check joins those pieces into one RESP frame.

Any Redis failure (down, refused, timed out, an error reply) raises
LimiterUnavailable and nothing else; from_url() builds a client with a short
per-call deadline and no retries, because a StoreBreaker decides when to try again.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tollway.limits import multi
from tollway.limits.concurrency import Concurrency, ConcurrencyState, acquire
from tollway.limits.decision import Decision, check_cost, per_limit_costs, reported_index
from tollway.limits.errors import LimiterUnavailable
from tollway.limits.gcra import Gcra, GcraState
from tollway.limits.memory import Charge, Key, LimitResult
from tollway.limits.multi import Limit, State
from tollway.limits.redis_scripts import ACQUIRE, CHECK, REFUND
from tollway.limits.resp import (
    Arg,
    NoScriptError,
    Reply,
    RespClient,
    RespClientError,
    array_header,
    bulk,
    encode_command,
)
from tollway.limits.windows import (
    FixedState,
    FixedWindow,
    Per,
    SlidingState,
    SlidingWindow,
    window_bounds,
)

DEFAULT_PREFIX = "tollway:rl:"
CONCURRENCY_SLOT = "concurrency"
_EPOCH_PERIODS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
_FIELDS = 8  # reply doubles per limit: 5 of the decision, 3 of the state
_KEY_CACHE_SIZE = 16_384  # encoded keys kept (cleared whole when full)
_PLAN_CACHE_SIZE = 1_024  # plans of limit sequences that are not multi.Windows
_SPEC_CACHE_SIZE = 64  # encoded specs per plan (by costs and calendar bounds)
_PLAN_ATTR = "_tollway_redis_plan"  # where a multi.Windows keeps its plan
_NOW_REDIS = bulk("")  # ARGV[1] "": the script reads Redis's clock


@dataclass(frozen=True, slots=True)
class _Script:
    text: str
    sha: str

    @classmethod
    def of(cls, text: str) -> _Script:
        return cls(text, hashlib.sha1(text.encode(), usedforsecurity=False).hexdigest())


_CHECK = _Script.of(CHECK)
_REFUND = _Script.of(REFUND)
_ACQUIRE = _Script.of(ACQUIRE)


def encode_key(key_parts: Sequence[str]) -> str:
    """Collision-free text for key parts: "<count>" then "|<utf-8 length>:<part>" each.

    Never empty (an empty hash tag would hash the whole key name, scattering the
    windows of one key over cluster slots).
    """
    return str(len(key_parts)) + "".join(f"|{len(p.encode())}:{p}" for p in key_parts)


@dataclass(slots=True)
class RedisLease:
    """A concurrency slot held in Redis; release() gives it back (idempotent:
    later calls return False). It expires by itself after the lease ttl, so a
    crashed node's slots come back. A failed release raises LimiterUnavailable
    and may be retried."""

    _limiter: RedisLimiter
    key: str
    member: str
    cost: int
    released: bool = False

    async def release(self) -> bool:
        if self.released:
            return False
        self.released = True  # a concurrent second call is a no-op
        try:
            await self._limiter._release(self.key, self.member)
        except LimiterUnavailable:
            self.released = False
            raise
        return True

    async def __aenter__(self) -> RedisLease:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.release()


class _CalendarBounds:
    """Bounds of the previous, current and next calendar window, as script args
    (text, and encoded as RESP bulk strings), kept while the clock stays in the
    same current window (no datetime work on the hot path)."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], tuple[float, float, tuple[str, ...], bytes]] = {}

    def _entry(self, at: float, per: Per, tz: str) -> tuple[float, float, tuple[str, ...], bytes]:
        held = self._held.get((per, tz))
        if held is not None and held[0] <= at < held[1]:
            return held
        start, end = window_bounds(at, per, tz)
        previous = window_bounds(start - 1.0, per, tz)  # windows last >= 23 hours
        following = window_bounds(end, per, tz)
        args = tuple(repr(float(x)) for x in (*previous, start, end, *following))
        entry = (start, end, args, b"".join(bulk(a) for a in args))
        self._held[(per, tz)] = entry
        return entry

    def around(self, at: float, per: Per, tz: str) -> tuple[str, ...]:
        return self._entry(at, per, tz)[2]

    def around_encoded(self, at: float, per: Per, tz: str) -> bytes:
        return self._entry(at, per, tz)[3]


_StateOf = Callable[[Any, Any, Any], State]


def _gcra_state(a: Any, _b: Any, _c: Any) -> State:
    return GcraState(float(a))


def _sliding_state(a: Any, b: Any, c: Any) -> State:
    return SlidingState(float(a), int(b), int(c))


def _fixed_state(a: Any, b: Any, _c: Any) -> State:
    return FixedState(float(a), int(b))


def _spec_args(limit: Limit) -> tuple[str, tuple[Arg, ...]]:
    """A limit's script record (redis_scripts read_spec) around its cost: the kind,
    and what follows the cost (without the calendar bounds of a "c" record)."""
    if isinstance(limit, Gcra):
        return "g", (limit.limit, repr(float(limit.period)), limit.capacity)
    if isinstance(limit, SlidingWindow):
        return "s", (limit.limit, repr(float(limit.period)))
    period = _EPOCH_PERIODS.get(limit.per)
    if period is not None:
        return "f", (limit.limit, repr(period))
    return "c", (limit.limit,)


@dataclass(slots=True, eq=False)
class _Plan:
    """A check of one limit sequence, encoded once: the frame's head up to the
    keys (EVALSHA of CHECK, with the element count), the count of limits, and per
    limit the record pieces before and after its cost. The record of a calendar
    window ends with bounds that change with the day (_CalendarBounds)."""

    slots: tuple[str, ...]
    head: bytes
    count: bytes
    before_cost: tuple[bytes, ...]
    after_cost: tuple[bytes, ...]
    calendar: tuple[tuple[int, Per, str], ...]  # (index, per, tz) of calendar windows
    state_of: tuple[_StateOf, ...]
    reply: struct.Struct  # the CHECK reply: 1 + _FIELDS * n little-endian doubles
    specs: dict[tuple[tuple[int, ...], tuple[bytes, ...]], bytes] = field(default_factory=dict)

    @classmethod
    def of(cls, limits: tuple[Limit, ...]) -> _Plan:
        if not limits:
            raise ValueError("at least one limit")
        slots = multi.check_slots(limits)  # raises when two share a counter
        before: list[bytes] = []
        after: list[bytes] = []
        calendar: list[tuple[int, Per, str]] = []
        state_of: list[_StateOf] = []
        argc = 2  # now, count
        for i, limit in enumerate(limits):
            kind, rest = _spec_args(limit)
            before.append(bulk(kind))
            after.append(b"".join(bulk(a) for a in rest))
            argc += 2 + len(rest)
            if kind == "c":
                assert not isinstance(limit, Gcra | SlidingWindow)
                calendar.append((i, limit.per, limit.tz))
                argc += 6
            state_of.append(
                _gcra_state if kind == "g" else _sliding_state if kind == "s" else _fixed_state
            )
        n = len(limits)
        head = array_header(3 + n + argc) + bulk("EVALSHA") + bulk(_CHECK.sha) + bulk(n)
        return cls(slots, head, bulk(n), tuple(before), tuple(after), tuple(calendar),
                   tuple(state_of), struct.Struct(f"<{1 + _FIELDS * n}d"))  # fmt: skip

    def encoded_specs(self, costs: tuple[int, ...], bounds: _CalendarBounds, at: float) -> bytes:
        """The records of every limit at these costs (validated once, then cached)."""
        cal = tuple(bounds.around_encoded(at, per, tz) for _, per, tz in self.calendar)
        found = self.specs.get((costs, cal))
        if found is not None:
            return found
        for c in costs:
            check_cost(c)
        pieces: list[bytes] = []
        extra = dict(zip((i for i, _, _ in self.calendar), cal, strict=True))
        for i, c in enumerate(costs):
            pieces += (self.before_cost[i], bulk(c), self.after_cost[i], extra.get(i, b""))
        encoded = b"".join(pieces)
        if len(self.specs) >= _SPEC_CACHE_SIZE:
            self.specs.clear()
        self.specs[(costs, cal)] = encoded
        return encoded


class RedisLimiter:
    def __init__(
        self,
        client: RespClient,
        *,
        prefix: str = DEFAULT_PREFIX,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`wall_clock` (local epoch seconds) only picks the calendar bounds sent
        to the script; the decisions use Redis's clock (or an explicit `now`)."""
        if "{" in prefix or "}" in prefix:
            raise ValueError("prefix may not contain braces (they make the hash tag)")
        self.client = client
        self.prefix = prefix
        self._wall_clock = wall_clock
        self._calendar = _CalendarBounds()
        self._keys: dict[tuple[Key, tuple[str, ...]], bytes] = {}
        self._plans: dict[tuple[Limit, ...], _Plan] = {}
        self._owns_client = False

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout: float = 0.25,
        prefix: str = DEFAULT_PREFIX,
    ) -> RedisLimiter:
        """A limiter with its own client (redis://host:port/db, AUTH from the URL's
        user and password): every call and the connect get `timeout` seconds, no
        retries. aclose() closes it."""
        limiter = cls(RespClient.from_url(url, timeout=timeout), prefix=prefix)
        limiter._owns_client = True
        return limiter

    async def aclose(self) -> None:
        """Close the client when this limiter built it (from_url); a client passed
        in belongs to the caller."""
        if self._owns_client:
            await self.client.aclose()

    def key_for(self, key_parts: Sequence[str], limit: Limit | Concurrency) -> str:
        """The Redis key of `limit`'s counter under `key_parts`."""
        slot = CONCURRENCY_SLOT if isinstance(limit, Concurrency) else multi.slot_id(limit)
        return self._key(key_parts, slot)

    # -- rate limits --------------------------------------------------------

    async def check(
        self,
        key_parts: Sequence[str],
        limits: Sequence[Limit],
        cost: int | Sequence[int] = 1,
        *,
        now: float | None = None,
    ) -> LimitResult:
        """Check every limit for this key; consume in all only if all allow
        (multi.check_all). `cost`: one for every limit, or one per limit."""
        key: Key = tuple(key_parts)
        if not isinstance(limits, tuple):  # a multi.Windows is kept: it holds its plan
            limits = tuple(limits)
        plan = self._plan(limits)
        costs = per_limit_costs(cost, len(limits))
        frame = self._check_frame(plan, key, costs, now)
        return _decode_check(plan, key, limits, costs, await self._run(_CHECK, frame))

    def send_check(
        self, key_parts: tuple[str, ...], limits: tuple[Limit, ...], costs: tuple[int, ...]
    ) -> SentCheck | None:
        """check() without a coroutine: the CHECK goes out now on the open connection
        and SentCheck.result() decodes its reply once the future is done. None when
        no connection is open yet (then call check(), which connects). `costs` has
        one cost per limit."""
        client = self.client
        if not client.connected:
            return None
        plan = self._plan(limits)
        sent = client.send_now(self._check_frame(plan, key_parts, costs, None))
        if sent is None:
            return None
        return SentCheck(sent, plan, key_parts, limits, costs)

    def _check_frame(
        self, plan: _Plan, key: Key, costs: tuple[int, ...], now: float | None
    ) -> bytes:
        at = (self._wall_clock() if now is None else now) if plan.calendar else 0.0
        specs = plan.encoded_specs(costs, self._calendar, at)
        keys = self._keys.get((key, plan.slots))
        if keys is None:
            keys = self._encoded_keys(key, plan.slots)
        return b"".join(
            (plan.head, keys, _NOW_REDIS if now is None else bulk(repr(float(now))),
             plan.count, specs)
        )  # fmt: skip

    async def refund(
        self, charge: Charge, cost: int | None = None, *, now: float | None = None
    ) -> None:
        """Give back what an allowed check consumed (with `cost`, at most that much
        per limit), in one round trip; at most once per charge (a failed refund
        raises LimiterUnavailable and is not tried again: it may have run)."""
        if charge.refunded:
            return
        if cost is not None:
            check_cost(cost)
        charge.refunded = True
        keys = [self._key(charge.key, multi.slot_id(limit)) for limit in charge.limits]
        at = self._wall_clock() if now is None else now
        args: list[Arg] = [_now_arg(now), len(charge.limits)]
        for limit, charged, spent in zip(charge.limits, charge.charged, charge.costs, strict=True):
            amount = spent if cost is None else min(cost, spent)
            args += self._spec(limit, amount, at)
            start = charged.window_start if isinstance(charged, SlidingState | FixedState) else 0.0
            args.append(repr(float(start)))
        await self._eval(_REFUND, keys, args)

    # -- concurrency --------------------------------------------------------

    async def acquire(
        self,
        key_parts: Sequence[str],
        limit: Concurrency,
        cost: int = 1,
        *,
        lease_ttl: float = 300.0,
    ) -> tuple[Decision, RedisLease | None]:
        """Take `cost` concurrency slots; the lease (None when refused) must be
        released, and expires by itself `lease_ttl` seconds (Redis time) after.

        The counter is per key parts, whatever the limit value (like slot_id: a
        raised limit keeps the requests already in flight)."""
        check_cost(cost)
        if lease_ttl <= 0:
            raise ValueError("lease_ttl must be > 0")
        key = self._key(tuple(key_parts), CONCURRENCY_SLOT)
        member = f"{cost}:{uuid.uuid4().hex}"
        reply = _array(
            await self._eval(
                _ACQUIRE, [key], ["", cost, limit.limit, repr(float(lease_ttl)), member]
            )
        )
        # The script applies concurrency.acquire's rule; its decision says the rest.
        decision, _ = acquire(ConcurrencyState(int(reply[1])), cost, limit)
        if int(reply[0]) != 1:
            return decision, None
        return decision, RedisLease(self, key, member, cost)

    async def _release(self, key: str, member: str) -> None:
        try:
            await self.client.call("ZREM", key, member)
        except (RespClientError, OSError) as exc:
            raise _unavailable(exc) from exc

    # -- internals ----------------------------------------------------------

    def _key(self, key_parts: Sequence[str], slot: str) -> str:
        return f"{self.prefix}{{{encode_key(key_parts)}}}:{slot}"

    def _encoded_keys(self, key: Key, slots: tuple[str, ...]) -> bytes:
        encoded = b"".join(bulk(self._key(key, slot)) for slot in slots)
        if len(self._keys) >= _KEY_CACHE_SIZE:
            self._keys.clear()  # cheap to rebuild; keeps memory bounded under many keys
        self._keys[(key, slots)] = encoded
        return encoded

    def _plan(self, limits: tuple[Limit, ...]) -> _Plan:
        """The plan of `limits`: kept on a multi.Windows itself (the plugin compiles
        one per limit set, so this is an attribute read per check), else cached
        here by value."""
        held: dict[str, Any] | None = getattr(limits, "__dict__", None)
        if held is not None:  # a multi.Windows (a tuple subclass with a __dict__)
            plan = held.get(_PLAN_ATTR)
            if plan is None:
                plan = held[_PLAN_ATTR] = _Plan.of(limits)
            return plan
        found = self._plans.get(limits)
        if found is None:
            found = _Plan.of(limits)
            if len(self._plans) >= _PLAN_CACHE_SIZE:
                self._plans.clear()
            self._plans[limits] = found
        return found

    def _spec(self, limit: Limit, cost: int, at: float) -> list[Arg]:
        """The script record of one limit (redis_scripts read_spec), as arguments."""
        kind, rest = _spec_args(limit)
        if kind == "c":
            assert isinstance(limit, FixedWindow)
            return [kind, cost, *rest, *self._calendar.around(at, limit.per, limit.tz)]
        return [kind, cost, *rest]

    async def _eval(self, script: _Script, keys: Sequence[str], args: Sequence[Arg]) -> Reply:
        frame = encode_command(("EVALSHA", script.sha, len(keys), *keys, *args))
        return await self._run(script, frame)

    async def _run(self, script: _Script, frame: bytes) -> Reply:
        """EVALSHA (the frame); on NOSCRIPT, SCRIPT LOAD and the frame once more."""
        client = self.client
        try:
            missing = False
            try:
                sent = client.send_now(frame)
                reply = await (sent if sent is not None else client.execute(frame))
            except NoScriptError:
                missing = True
            if missing:
                # Awaited outside the handler: a compiled coroutine suspended inside
                # an except block leaves its exception as the one the thread is
                # handling while everything else on the loop runs.
                await client.call("SCRIPT", "LOAD", script.text)
                reply = await client.execute(frame)
        except (RespClientError, OSError) as exc:
            raise _unavailable(exc) from exc
        return reply


class SentCheck:
    """A CHECK sent by RedisLimiter.send_check: the reply's future and its decoding."""

    def __init__(
        self,
        future: asyncio.Future[Reply],
        plan: _Plan,
        key: Key,
        limits: tuple[Limit, ...],
        costs: tuple[int, ...],
    ) -> None:
        self.future = future
        self.plan = plan
        self.key = key
        self.limits = limits
        self.costs = costs
        self.started = time.perf_counter()

    def result(self) -> LimitResult | None:
        """The decision, once the future is done. None when Redis did not know the
        script (NOSCRIPT: nothing ran; check() loads it and checks again);
        LimiterUnavailable when Redis failed."""
        future = self.future
        if future.cancelled():
            raise LimiterUnavailable("redis limit store: the call was cancelled")
        exc = future.exception()
        if exc is not None:
            if isinstance(exc, NoScriptError):
                return None
            if isinstance(exc, (RespClientError, OSError)):
                raise _unavailable(exc)
            raise exc
        return _decode_check(self.plan, self.key, self.limits, self.costs, future.result())


def _decode_check(
    plan: _Plan, key: Key, limits: tuple[Limit, ...], costs: tuple[int, ...], raw: Reply
) -> LimitResult:
    reply = _doubles(plan.reply, raw)
    decisions: list[Decision] = []
    states: list[State] = []
    i = 1
    for state_of in plan.state_of:
        decisions.append(
            Decision(
                reply[i] == 1.0,
                int(reply[i + 1]),
                int(reply[i + 2]),
                reply[i + 3],
                reply[i + 4],
            )
        )
        states.append(state_of(reply[i + 5], reply[i + 6], reply[i + 7]))
        i += _FIELDS
    allowed = reply[0] == 1.0
    reported = reported_index(decisions, allowed)
    charge = Charge(key, limits, costs, tuple(states)) if allowed else None
    return LimitResult(
        allowed,
        decisions[reported],
        None if allowed else limits[reported],
        tuple(decisions),
        charge,
    )


def _array(reply: Reply) -> list[Any]:
    """A script's table reply (anything else means the script and this code differ)."""
    if not isinstance(reply, list):
        raise LimiterUnavailable(f"redis limit store: unexpected reply {reply!r:.80}")
    return reply


def _doubles(layout: struct.Struct, reply: Reply) -> tuple[float, ...]:
    """The CHECK reply (one bulk string of packed doubles) as its numbers."""
    if not isinstance(reply, bytes) or len(reply) != layout.size:
        raise LimiterUnavailable(f"redis limit store: unexpected reply {reply!r:.80}")
    return layout.unpack(reply)


def _unavailable(exc: BaseException) -> LimiterUnavailable:
    return LimiterUnavailable(f"redis limit store: {type(exc).__name__}: {exc}")


def _now_arg(now: float | None) -> str:
    return "" if now is None else repr(float(now))
