"""Plans and burst grants: what a consumer may do, and the PlanBook that caches them.

A plan is a named set of windows (at most one per `per`): "pro" = 10 per second
with a burst of 20, 1000 per day. A consumer's `plan` column holds the plan's name.
A grant adds `extra` to one window of one consumer until `expires_at` (epoch
seconds): fixed and sliding windows get `limit + extra`, GCRA gets `burst + extra`
(the rate stays, the consumer may run ahead further).

These are plain frozen records with their validation; the database side lives in
identity/plans.py, which hands the PlanBook a loader, so this module imports no
database or web code and the rate-limit plugin reads plans and grants with one
dict lookup each, never awaiting.

The PlanBook holds every plan and every unexpired, unrevoked grant (both small:
plans are a handful, grants are temporary). It reloads them all when told of a
"plan" or "grant" change (or a reset: continuity of changes lost), which the key
resolver's change feed forwards to it (in process, Redis pub/sub, outbox poll), and
every `refresh_interval` as a safety net. A failed reload keeps what it had.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog

from tollway.limits.windows import PERS, Per

log = structlog.get_logger("tollway.plans")

# Windows a GCRA (and so a burst) can express: a burst over a day or a calendar
# month would be a second quota, not a burst.
BURST_PERS: tuple[str, ...] = ("second", "minute", "hour")
# The largest count anything stores (a 32-bit signed integer, as the key limits).
MAX_COUNT = 2_147_483_647
NAME_MAX = 64
DESCRIPTION_MAX = 1000
REASON_MAX = 200
# Plan names appear in URLs (/plans/{name}) and in consumers' `plan` column.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# How often the PlanBook reloads without being told (a bound on a missed change,
# and when expired grants leave memory), and how soon it retries a failed reload.
REFRESH_INTERVAL = 60.0
RETRY_INTERVAL = 1.0
# A reload that takes longer has failed (a database that accepts and never answers).
LOAD_TIMEOUT = 10.0
# The change kinds that concern the PlanBook (identity/changes.py records them).
CHANGE_KINDS = frozenset({"plan", "grant"})


class PlanError(ValueError):
    """An invalid plan, window or grant; `field` is its path ("limits[1].burst")."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


def check_count(value: object, field: str, *, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_COUNT:
        kind = "null or an integer" if optional else "an integer"
        raise PlanError(
            f"{field.rsplit('.', 1)[-1]} must be {kind} from 1 to {MAX_COUNT}", field=field
        )
    return value


def check_per(value: object, field: str = "per") -> Per:
    if value not in PERS:
        raise PlanError(f"per must be one of {', '.join(PERS)}", field=field)
    return cast(Per, value)


def check_plan_name(name: object, field: str = "name") -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= NAME_MAX or not _NAME_RE.match(name):
        raise PlanError(
            f"name must be 1 to {NAME_MAX} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field=field,
        )
    return name


def check_text(value: object, field: str, max_len: int) -> str:
    if not isinstance(value, str) or len(value) > max_len:
        raise PlanError(f"{field} must be a string of at most {max_len} characters", field=field)
    if "\x00" in value:
        # PostgreSQL text cannot hold NUL; SQLite would store it: refuse on both.
        raise PlanError(f"{field} must not contain NUL characters", field=field)
    return value.strip()


def _check_window(per: object, limit: object, burst: object, cost: object, field: str) -> None:
    prefix = f"{field}." if field else ""
    check_per(per, f"{prefix}per")
    check_count(limit, f"{prefix}limit")
    check_count(burst, f"{prefix}burst", optional=True)
    check_count(cost, f"{prefix}cost", optional=True)
    if burst is not None and per not in BURST_PERS:
        raise PlanError(
            f"burst applies to per {', '.join(BURST_PERS)} only", field=f"{prefix}burst"
        )


@dataclass(frozen=True, slots=True)
class WindowSpec:
    """One window of a plan: `limit` per `per`; `burst` (GCRA, second/minute/hour
    only) lets that many run back to back; `cost` (None: the request's own) is
    what one request takes from this window."""

    per: Per
    limit: int
    burst: int | None = None
    cost: int | None = None

    def __post_init__(self) -> None:
        _check_window(self.per, self.limit, self.burst, self.cost, "")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"per": self.per, "limit": self.limit}
        if self.burst is not None:
            out["burst"] = self.burst
        if self.cost is not None:
            out["cost"] = self.cost
        return out

    @classmethod
    def from_dict(cls, data: object, field: str = "") -> WindowSpec:
        """A window from its JSON form; PlanError (with `field`) when it is not one."""
        if not isinstance(data, Mapping):
            raise PlanError("a window must be an object", field=field or "limits")
        prefix = f"{field}." if field else ""
        unknown = set(data) - {"per", "limit", "burst", "cost"}
        if unknown:
            name = sorted(str(k) for k in unknown)[0]
            raise PlanError(f"unknown field {name!r}", field=f"{prefix}{name}")
        per, limit, burst, cost = (data.get(k) for k in ("per", "limit", "burst", "cost"))
        # Checked here first so that an error names the window's path.
        _check_window(per, limit, burst, cost, field)
        return cls(per=cast(Per, per), limit=cast(int, limit), burst=burst, cost=cost)


def check_limits(limits: Iterable[WindowSpec | Mapping[str, Any]]) -> tuple[WindowSpec, ...]:
    """Windows in PERS order, at most one per `per` (PlanError names the one at fault)."""
    if isinstance(limits, (str, bytes, Mapping)):
        raise PlanError("limits must be a list of windows", field="limits")
    seen: dict[str, WindowSpec] = {}
    for i, item in enumerate(limits):
        field = f"limits[{i}]"
        spec = item if isinstance(item, WindowSpec) else WindowSpec.from_dict(item, field)
        if spec.per in seen:
            raise PlanError(f"two windows per {spec.per}: give one", field=f"{field}.per")
        seen[spec.per] = spec
    return tuple(seen[per] for per in PERS if per in seen)


@dataclass(frozen=True, slots=True)
class Plan:
    """A named set of windows. No windows at all: the plan sets no limits."""

    name: str
    limits: tuple[WindowSpec, ...]
    description: str = ""

    def __post_init__(self) -> None:
        check_plan_name(self.name)
        object.__setattr__(self, "limits", check_limits(self.limits))
        check_text(self.description, "description", DESCRIPTION_MAX)

    def window(self, per: str) -> WindowSpec | None:
        for spec in self.limits:
            if spec.per == per:
                return spec
        return None


@dataclass(frozen=True, slots=True)
class Grant:
    """`extra` more in the consumer's `per` window until `expires_at` (epoch seconds)."""

    id: str
    consumer_id: str
    per: Per
    extra: int
    expires_at: float
    reason: str = ""

    def __post_init__(self) -> None:
        check_per(self.per)
        check_count(self.extra, "extra")
        if (
            isinstance(self.expires_at, bool)
            or not isinstance(self.expires_at, (int, float))
            or not math.isfinite(self.expires_at)
        ):
            raise PlanError("expires_at must be a finite time", field="expires_at")
        check_text(self.reason, "reason", REASON_MAX)

    def active(self, now: float) -> bool:
        return now < self.expires_at


def grant_extras(grants: Iterable[Grant]) -> dict[str, int]:
    """`per` -> the sum of `extra` over the grants given (pass the active ones)."""
    extras: dict[str, int] = {}
    for grant in grants:
        extras[grant.per] = extras.get(grant.per, 0) + grant.extra
    return extras


# What a PlanBook loads: every plan, and every grant not revoked or expired.
Loader = Callable[[], Awaitable[tuple[Sequence[Plan], Sequence[Grant]]]]


class PlanBook:
    """Every plan and live grant, in this process, kept current by change notices.

    `plan` and `grants` are synchronous dict lookups for the request path. Wire
    `on_change` / `on_reset` to a change feed (runtime.py hands them to the key
    resolver's), then `start()`: it loads once (raising if that fails), then
    reloads on every plan/grant notice, on a reset, and every `refresh_interval`.
    `generation` grows with every successful load, so that what a caller derives
    from the plans (compiled limits) can tell when to derive again.
    """

    def __init__(
        self,
        loader: Loader,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        retry_interval: float = RETRY_INTERVAL,
        load_timeout: float = LOAD_TIMEOUT,
    ) -> None:
        self.loader = loader
        self.refresh_interval = refresh_interval
        self.retry_interval = retry_interval
        self.load_timeout = load_timeout
        self._plans: dict[str, Plan] = {}
        # consumer id -> their grants, soonest expiry first.
        self._grants: dict[str, tuple[Grant, ...]] = {}
        self.generation = 0
        # False while there is no plan and no grant at all: the request path then
        # skips its lookups.
        self.populated = False
        self.loads = 0
        self.load_errors = 0
        self.notices = 0
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    # ---- the request path ------------------------------------------------------------

    def plan(self, name: str | None) -> Plan | None:
        """The plan with this name (None for no name or an unknown one)."""
        if name is None:
            return None
        return self._plans.get(name)

    def grants(self, consumer_id: str, now: float) -> tuple[Grant, ...]:
        """The consumer's grants still active at `now` (epoch seconds)."""
        held = self._grants.get(consumer_id)
        if held is None:
            return ()
        if now < held[0].expires_at:
            return held
        return tuple(g for g in held if now < g.expires_at)

    def plans(self) -> tuple[Plan, ...]:
        return tuple(self._plans.values())

    # ---- change notices (sync: called by the change feed) --------------------------------

    def on_change(self, kind: str, ref: str) -> None:
        if kind in CHANGE_KINDS:
            self.notices += 1
            self._wake.set()

    def on_reset(self) -> None:
        self.notices += 1
        self._wake.set()

    # ---- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.reload()
        self._task = asyncio.create_task(self._run(), name="tollway-plan-book")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def reload(self) -> None:
        """Load everything now and swap it in whole; raises (keeping the old) on failure."""
        # One load at a time: a slow older load must not land after a newer one.
        async with self._lock:
            async with asyncio.timeout(self.load_timeout):
                plans, grants = await self.loader()
            by_consumer: dict[str, list[Grant]] = {}
            for grant in grants:
                by_consumer.setdefault(grant.consumer_id, []).append(grant)
            self._plans = {p.name: p for p in plans}
            self._grants = {
                cid: tuple(sorted(gs, key=lambda g: g.expires_at))
                for cid, gs in by_consumer.items()
            }
            self.populated = bool(self._plans) or bool(self._grants)
            self.generation += 1
            self.loads += 1

    async def _run(self) -> None:
        delay = self.refresh_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            # Cleared before the load: a notice arriving during it wakes another.
            self._wake.clear()
            try:
                await self.reload()
            except Exception as exc:  # noqa: BLE001 (database down: keep the plans, retry)
                self.load_errors += 1
                delay = self.retry_interval
                if self.load_errors == 1 or self.load_errors % 100 == 0:
                    log.warning(
                        "plan reload failed; keeping the loaded plans",
                        error=f"{type(exc).__name__}: {exc}",
                        failures=self.load_errors,
                    )
            else:
                delay = self.refresh_interval
