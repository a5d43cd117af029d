"""Temporary bans of abusive sources (an IP address or a consumer), and the failure
counts that lead to them.

A source that gets `threshold` failed answers (401, 404, ...: the caller decides
what a failure is) within `window` seconds is banned for `ban_seconds`, longer for
a repeat offender when the policy has a growth factor. Bans expire by themselves;
an operator lists, adds and lifts them through the admin API.

Two stores with one interface (`BanStore`):

- `MemoryBans`: this process only, synchronous under the hood, bounded dicts.
- `RedisBans` (limits/redis_bans.py): shared by every process and node. A ban is a key
  `{prefix}ban:{kind}:{value}` with a PX TTL (so Redis expires it), listed through a
  sorted set per kind (score = end of the ban; members whose key is gone are
  skipped and pruned). Failures are counted by a Lua script (INCRBY, PEXPIRE on the
  first one, the ban itself when the threshold is crossed: one atomic round trip),
  and every ban and lift is published on `{prefix}bans` (`tollway:bans`).

The hot path (`banned()`) never talks to Redis: each process keeps the active bans
in a dict, fed by its own bans, by the pub/sub channel, and by a full reload every
few seconds (a safety net for messages lost while Redis was away). Failures are
queued and sent by a background task, in batches. So a slow or dead Redis never
delays or fails a request: it only means fewer failures are counted (fail open),
which `stats` counts for the metrics.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import structlog

log = structlog.get_logger("tollway.bans")

KINDS: tuple[str, ...] = ("ip", "consumer")
PREFIX = "tollway:"
# Bound of every per-process table (bans, counts, strikes, queued failures): a flood
# from many addresses must not grow memory without end.
MAX_ENTRIES = 100_000
# Longest value counted or banned; longer ones are junk, not a source.
MAX_VALUE_LENGTH = 256
# Seconds between sweeps of a MemoryBans' ended entries.
SWEEP_INTERVAL = 10.0
# A growth factor's exponent stops here (2**64 ban lengths are capped anyway; the
# float power must not overflow).
_MAX_EXPONENT = 64
T = TypeVar("T")
Key = tuple[str, str]  # (kind, value)


class BanStoreUnavailable(Exception):
    """The shared ban store could not answer (down, unreachable, timed out)."""


@dataclass(frozen=True, slots=True)
class Ban:
    kind: str
    value: str
    reason: str
    # Epoch seconds.
    until: float
    created_at: float
    # The how-manieth automatic ban of this source within the policy's repeat
    # window (0 for a manual ban).
    strikes: int = 1

    def seconds_left(self, now: float) -> float:
        return max(0.0, self.until - now)

    def retry_after(self, now: float) -> int:
        """Whole seconds a client should wait (at least 1)."""
        return max(1, math.ceil(self.until - now))

    def encode(self) -> str:
        return json.dumps(
            {
                "kind": self.kind,
                "value": self.value,
                "reason": self.reason,
                "until_ms": round(self.until * 1000),
                "created_ms": round(self.created_at * 1000),
                "strikes": self.strikes,
            },
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, data: Any) -> Ban | None:
        """A Ban from its JSON (bytes, str) or parsed dict; junk gives None."""
        try:
            raw = json.loads(data) if isinstance(data, bytes | str) else data
            return cls(
                kind=str(raw["kind"]),
                value=str(raw["value"]),
                reason=str(raw.get("reason") or ""),
                until=float(raw["until_ms"]) / 1000.0,
                created_at=float(raw["created_ms"]) / 1000.0,
                strikes=int(raw.get("strikes", 1)),
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


@dataclass(frozen=True, slots=True)
class BanPolicy:
    """When failures become a ban, and for how long."""

    window: float
    threshold: int
    ban_seconds: float
    # Each further ban within `repeat_window` lasts `growth` times the previous one.
    growth: float = 1.0
    max_ban_seconds: float = 86400.0
    repeat_window: float = 86400.0

    def duration(self, strikes: int) -> float:
        exponent = min(max(strikes - 1, 0), _MAX_EXPONENT)
        return min(self.max_ban_seconds, self.ban_seconds * self.growth**exponent)

    def reason(self) -> str:
        return f"{self.threshold} failed requests within {self.window:g} s"


class BanStats:
    """What the store did, as plain cumulative ints (read by the metrics flusher)."""

    def __init__(self) -> None:
        self.bans: dict[str, int] = dict.fromkeys(KINDS, 0)
        self.blocked: dict[str, int] = dict.fromkeys(KINDS, 0)
        # Shared-store calls that failed, and failures that went uncounted (queue
        # full, or the store down): the price of failing open.
        self.store_errors = 0
        self.dropped = 0

    def snapshot(self) -> dict[str, int]:
        out = {f"bans:{k}": n for k, n in self.bans.items()}
        out.update({f"blocked:{k}": n for k, n in self.blocked.items()})
        out["store_errors"] = self.store_errors
        out["dropped"] = self.dropped
        return out


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")


def bounded_put(table: dict[Any, T], key: Any, value: T, limit: int) -> None:
    """Insert into a table that never holds more than `limit` entries; the oldest
    inserted goes first (dicts keep insertion order)."""
    if key not in table and len(table) >= limit:
        del table[next(iter(table))]
    table[key] = value


class BanStore:
    """The interface both stores share. `banned`, `failed` and `blocked` are
    synchronous and never touch the network: they are on the request path."""

    # True when every process and node sees the same bans (Redis).
    shared: ClassVar[bool] = False

    def __init__(self, *, clock: Callable[[], float] = time.time, max_entries: int) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self.stats = BanStats()
        # Active bans as this process knows them (some may have just ended: read
        # through `banned`). Empty most of the time, which callers may test first.
        self.active: dict[Key, Ban] = {}

    # ---- hot path ---------------------------------------------------------------

    def banned(self, kind: str, value: str) -> Ban | None:
        bans = self.active
        if not bans:
            return None
        ban = bans.get((kind, value))
        if ban is None:
            return None
        if ban.until <= self.clock():
            bans.pop((kind, value), None)
            return None
        return ban

    def failed(self, kind: str, value: str, policy: BanPolicy) -> None:
        """Count one failed request of a source, now or soon; never raises."""
        raise NotImplementedError

    def blocked(self, kind: str) -> None:
        """A request was refused because of a ban (for the metrics)."""
        self.stats.blocked[kind] = self.stats.blocked.get(kind, 0) + 1

    def counters(self) -> dict[str, int]:
        return self.stats.snapshot()

    # ---- everything else ----------------------------------------------------------

    async def record_failure(
        self, kind: str, value: str, policy: BanPolicy, count: int = 1
    ) -> Ban | None:
        """Count `count` failures now; the ban they caused, if they crossed the threshold."""
        raise NotImplementedError

    async def ban(self, kind: str, value: str, seconds: float, reason: str) -> Ban:
        """Ban a source by hand (replacing a ban it has)."""
        raise NotImplementedError

    async def lift(self, kind: str, value: str) -> bool:
        """End a ban and forget the source's counts; False when it had none."""
        raise NotImplementedError

    async def list_bans(
        self, kind: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Ban]:
        """Active bans, soonest to end first."""
        raise NotImplementedError

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    # ---- local table --------------------------------------------------------------

    def _remember(self, ban: Ban) -> None:
        key = (ban.kind, ban.value)
        bans = self.active
        if key not in bans and len(bans) >= self.max_entries:
            now = self.clock()
            for k in [k for k, b in bans.items() if b.until <= now]:
                del bans[k]
        bounded_put(bans, key, ban, self.max_entries)


class MemoryBans(BanStore):
    """Bans and counts of this process only (one worker, no Redis)."""

    def __init__(
        self, *, clock: Callable[[], float] = time.time, max_entries: int = MAX_ENTRIES
    ) -> None:
        super().__init__(clock=clock, max_entries=max_entries)
        # source -> [failures, end of the window]
        self._counts: dict[Key, list[float]] = {}
        # source -> (bans so far, until when they are remembered)
        self._strikes: dict[Key, tuple[int, float]] = {}
        self._next_sweep = 0.0

    def sweep(self, now: float) -> None:
        """Drop ended bans, windows and strikes. Run now and then from the failure
        path, so that `active` empties once bans end and the ban check is one test
        of an empty dict again."""
        self._next_sweep = now + SWEEP_INTERVAL
        for key in [k for k, b in self.active.items() if b.until <= now]:
            del self.active[key]
        for key in [k for k, e in self._counts.items() if e[1] <= now]:
            del self._counts[key]
        for key in [k for k, (_, until) in self._strikes.items() if until <= now]:
            del self._strikes[key]

    def failed(self, kind: str, value: str, policy: BanPolicy) -> None:
        self.count(kind, value, policy)

    def count(self, kind: str, value: str, policy: BanPolicy, n: int = 1) -> Ban | None:
        key = (kind, value)
        if self.banned(kind, value) is not None:
            # Requests of a banned source are refused before they can fail; one that
            # got through anyway (attached elsewhere) must not lengthen the ban.
            return None
        now = self.clock()
        if now >= self._next_sweep:
            self.sweep(now)
        entry = self._counts.get(key)
        if entry is None or entry[1] <= now:
            entry = [0.0, now + policy.window]
            bounded_put(self._counts, key, entry, self.max_entries)
        entry[0] += n
        if entry[0] < policy.threshold:
            return None
        del self._counts[key]
        strikes, remembered_until = self._strikes.get(key, (0, 0.0))
        strikes = strikes + 1 if remembered_until > now else 1
        bounded_put(self._strikes, key, (strikes, now + policy.repeat_window), self.max_entries)
        ban = Ban(kind, value, policy.reason(), now + policy.duration(strikes), now, strikes)
        self._remember(ban)
        self.stats.bans[kind] += 1
        return ban

    async def record_failure(
        self, kind: str, value: str, policy: BanPolicy, count: int = 1
    ) -> Ban | None:
        return self.count(kind, value, policy, count)

    async def ban(self, kind: str, value: str, seconds: float, reason: str) -> Ban:
        check_kind(kind)
        now = self.clock()
        ban = Ban(kind, value, reason, now + seconds, now, 0)
        self._counts.pop((kind, value), None)
        self._remember(ban)
        self.stats.bans[kind] += 1
        return ban

    async def lift(self, kind: str, value: str) -> bool:
        key = (kind, value)
        self._counts.pop(key, None)
        self._strikes.pop(key, None)
        ban = self.active.pop(key, None)
        return ban is not None and ban.until > self.clock()

    async def list_bans(
        self, kind: str | None = None, offset: int = 0, limit: int = 100
    ) -> list[Ban]:
        now = self.clock()
        self.sweep(now)
        active = sorted(
            (b for b in self.active.values() if kind is None or b.kind == kind),
            key=lambda b: (b.until, b.kind, b.value),
        )
        return active[offset : offset + limit]
