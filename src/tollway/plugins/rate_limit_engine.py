"""What rate-limit does on every request, compiled (mypyc): see plugins/rate_limit.py.

The plugin module keeps the configuration schema and the class the pipeline knows;
this one holds the per-request work: which limits apply, the counter key, the check
in the store, the headers and the refusal. It is kept free of pydantic (a compiled
module cannot hold the schema's models as native classes) and of closures and
generator expressions, which cost a frame each in compiled code as in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

import structlog

from tollway.gateway.context import AccessResult, Deferred, RequestContext, Response
from tollway.limits.concurrency import Concurrency
from tollway.limits.decision import Decision
from tollway.limits.errors import LimiterUnavailable
from tollway.limits.gcra import Gcra
from tollway.limits.memory import Charge, Lease, LimitResult
from tollway.limits.multi import Limit, Windows
from tollway.limits.service import LimitService, scaled
from tollway.limits.windows import PERS, FixedWindow, Per, SlidingWindow

if TYPE_CHECKING:
    from tollway.limits.plans import PlanBook
    from tollway.limits.redis_store import RedisLease, SentCheck

log = structlog.get_logger("tollway.rate_limit")

PERIODS: Final[dict[str, float]] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
# Nominal lengths for RateLimit-Policy's w= of calendar windows.
NOMINAL: Final[dict[str, int]] = {
    "second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 2592000,
}  # fmt: skip
VARS: Final = "rate-limit"
# Distinct limit sets a plugin remembers (one per plan/override/grant mix seen).
MAX_COMPILED: Final = 4096

# key_by parts, resolved once from their names.
KEY_IP: Final = 0
KEY_CONSUMER: Final = 1
KEY_KEY: Final = 2
KEY_ROUTE: Final = 3
KEY_HEADER: Final = 4


@dataclass(frozen=True, slots=True)
class Window:
    per: Per
    limit: int
    burst: int | None
    cost: int | None


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Windows compiled for the store, with what the headers say of them."""

    limits: tuple[Limit, ...]
    costs: tuple[int, ...]
    names: tuple[str, ...]
    policy: bytes  # RateLimit-Policy, precomputed
    quoted: tuple[bytes, ...]  # each window's name as a RateLimit item: b'"minute"'
    degraded: tuple[Limit, ...]  # the same cut to degrade_share


def compile_windows(
    windows: tuple[Window, ...], algorithm: str, tz: str, cost: int, share: float
) -> LimitSet | None:
    """Turn windows into limits (shortest first); None when there are none."""
    if not windows:
        return None
    ordered = sorted(windows, key=_per_index)
    limits: list[Limit] = []
    for w in ordered:
        limit: Limit
        if w.per not in PERIODS or algorithm == "fixed_window":
            limit = FixedWindow(w.limit, w.per, tz)
        elif algorithm == "gcra":
            limit = Gcra(w.limit, PERIODS[w.per], w.burst)
        else:
            limit = SlidingWindow(w.limit, PERIODS[w.per])
        limits.append(limit)
    names = tuple([w.per for w in ordered])
    policy = ", ".join(
        [
            f'"{name}";q={_capacity(limit)};w={NOMINAL[name]}'
            for name, limit in zip(names, limits, strict=True)
        ]
    ).encode()
    return LimitSet(
        limits=Windows(limits),  # raises when two windows would share a counter
        costs=tuple([cost if w.cost is None else w.cost for w in ordered]),
        names=names,
        policy=policy,
        quoted=tuple([b'"' + name.encode() + b'"' for name in names]),
        degraded=Windows([scaled(limit, share) for limit in limits]),
    )


def _per_index(w: Window) -> int:
    return PERS.index(w.per)


def _capacity(limit: Limit) -> int:
    return limit.capacity if isinstance(limit, Gcra) else limit.limit


def needs_log_phase(
    count_only_success: bool, refund_on_status: tuple[int, ...], concurrency: int | None
) -> bool:
    """Whether the log phase has work: a charge to give back or a slot to free."""
    return count_only_success or bool(refund_on_status) or concurrency is not None


_MISSING: Final = object()


def seconds_header(value: float) -> bytes:
    """Whole seconds for a header, rounded up (a client that waits that long passes)."""
    if value <= 1e-9:
        return b"0"
    return str(math.ceil(value - 1e-9)).encode()


class Held:
    """What access leaves for the log phase: the charge to refund, the slot to free."""

    def __init__(self, charge: Charge | None, shared: bool) -> None:
        self.charge = charge
        self.shared = shared
        self.lease: Lease | RedisLease | None = None


class RateLimitEngine:
    """One attachment's per-request work; the plugin hands it every request."""

    def __init__(
        self,
        default_windows: tuple[Window, ...],
        key_by: tuple[str, ...],
        namespace: str,
        algorithm: str,
        time_zone: str,
        cost: int,
        degrade_share: float,
        use_key_limits: bool,
        headers: bool,
        on_store_error: str,
        concurrency: int | None,
        concurrency_lease_seconds: float,
        count_only_success: bool,
        refund_on_status: tuple[int, ...],
    ) -> None:
        self.algorithm = algorithm
        self.time_zone = time_zone
        self.cost = cost
        self.degrade_share = degrade_share
        self.default_windows = default_windows
        self.default = self.compile(default_windows)
        self.compiled: dict[tuple[object, ...], LimitSet | None] = {}
        self.key_kinds: list[int] = []
        self.key_headers: list[bytes] = []
        for part in key_by:
            self.key_kinds.append(_KINDS.get(part, KEY_HEADER))
            self.key_headers.append(part[7:].encode() if part.startswith("header:") else b"")
        self.namespace = namespace
        self.use_key_limits = use_key_limits
        self.headers = headers
        self.on_store_error = on_store_error
        self.concurrency: Concurrency | None = (
            None if concurrency is None else Concurrency(concurrency)
        )
        self.local_concurrency: Concurrency | None = (
            None
            if concurrency is None
            else Concurrency(max(1, math.floor(concurrency * degrade_share)))
        )
        self.concurrency_lease_seconds = concurrency_lease_seconds
        self.count_only_success = count_only_success
        self.refund_statuses = frozenset(refund_on_status)
        # Whether the log phase reads what access holds (a charge to refund, a slot
        # to free): without it nothing is kept per request.
        self.holds = needs_log_phase(count_only_success, refund_on_status, concurrency)
        # Each window's capacity as header text: it is the same on every response.
        self.limit_texts: dict[int, bytes] = {}
        self.service: LimitService | None = None
        self.plans: PlanBook | None = None

    def bind(self, service: LimitService | None, plans: PlanBook | None) -> None:
        self.service = service
        self.plans = plans

    def compile(self, windows: tuple[Window, ...]) -> LimitSet | None:
        return compile_windows(
            windows, self.algorithm, self.time_zone, self.cost, self.degrade_share
        )

    # ---- which limits ------------------------------------------------------------

    def limit_set(self, ctx: RequestContext) -> LimitSet | None:
        consumer = ctx.consumer
        credential = ctx.credential
        plans = self.plans
        plan: Any = None
        grants: tuple[Any, ...] = ()
        if consumer is not None and plans is not None and plans.populated:
            plan_name = getattr(consumer, "plan", None)
            if plan_name:
                plan = plans.plan(plan_name)
            grants = plans.grants(str(consumer.id), ctx.started_at)
        per_minute: int | None = None
        per_day: int | None = None
        if credential is not None and self.use_key_limits:
            per_minute = getattr(credential, "limit_per_minute", None)
            per_day = getattr(credential, "limit_per_day", None)
        if plan is None and not grants and per_minute is None and per_day is None:
            return self.default
        memo = (plan, per_minute, per_day, tuple([(g.per, g.extra) for g in grants]))
        found = self.compiled.get(memo, _MISSING)
        if found is not _MISSING:
            return cast("LimitSet | None", found)
        compiled = self.compile(self._windows(plan, per_minute, per_day, grants))
        if len(self.compiled) >= MAX_COMPILED:
            self.compiled.clear()
        self.compiled[memo] = compiled
        return compiled

    def _windows(
        self, plan: Any, per_minute: int | None, per_day: int | None, grants: tuple[Any, ...]
    ) -> tuple[Window, ...]:
        """The key's own limits over the plan's (or the route's), raised by grants."""
        windows: dict[str, Window] = {}
        for w in plan.limits if plan is not None else self.default_windows:
            windows[w.per] = Window(w.per, w.limit, w.burst, w.cost)
        for per, value in (("minute", per_minute), ("day", per_day)):
            if value is not None:
                old = windows.get(per)
                windows[per] = Window(per, value, None, None if old is None else old.cost)  # type: ignore[arg-type]
        for grant in grants:
            found = windows.get(grant.per)
            if found is None:
                continue
            if found.per in PERIODS and self.algorithm == "gcra":
                burst = (found.limit if found.burst is None else found.burst) + grant.extra
                windows[found.per] = Window(found.per, found.limit, burst, found.cost)
            else:
                windows[found.per] = Window(
                    found.per, found.limit + grant.extra, found.burst, found.cost
                )
        return tuple(windows.values())

    def key(self, ctx: RequestContext) -> tuple[str, ...]:
        """The counter's key: the namespace and each key_by value (IP when absent), so
        an anonymous request never shares a counter with every other one."""
        kinds = self.key_kinds
        if len(kinds) == 1:
            return (self.namespace, self._part(ctx, kinds[0], self.key_headers[0]))
        parts = [self.namespace]
        for i in range(len(kinds)):
            parts.append(self._part(ctx, kinds[i], self.key_headers[i]))
        return tuple(parts)

    @staticmethod
    def _part(ctx: RequestContext, kind: int, header: bytes) -> str:
        if kind == KEY_CONSUMER:
            who = ctx.consumer
            if who is not None:
                return "consumer=" + str(who.id)
        elif kind == KEY_IP:
            pass
        elif kind == KEY_ROUTE:
            route = ctx.route
            return "route=" + (route.name if route is not None else "")
        elif kind == KEY_KEY:
            cred = ctx.credential
            key_id = getattr(cred, "key_id", None) if cred is not None else None
            if key_id is not None:
                return "key=" + str(key_id)
        else:
            value = ctx.header(header)
            if value is not None:
                return "header=" + value.decode("latin-1")
        return "ip=" + ctx.client_ip

    # ---- access ------------------------------------------------------------------

    def access(self, ctx: RequestContext) -> AccessResult:
        service = self.service
        if service is None:  # never bound: not a running gateway
            return Response.error("limiter_unavailable", ctx.request_id)
        limit_set = self.limit_set(ctx)
        if limit_set is None and self.concurrency is None:
            return None  # nothing limits this request (no windows anywhere)
        key = self.key(ctx)
        if service.redis is None:
            return self.check_local(ctx, service, key, limit_set, False)
        if not service.store_ready():
            return self.store_down(ctx, service, key, limit_set)
        if limit_set is not None and self.concurrency is None:
            sent = service.send_check(key, limit_set.limits, limit_set.costs)
            if sent is not None:
                return SharedCheck(self, ctx, service, key, limit_set, sent)
        return self.check_shared(ctx, service, key, limit_set)

    def check_local(
        self,
        ctx: RequestContext,
        service: LimitService,
        key: tuple[str, ...],
        limit_set: LimitSet | None,
        degraded: bool,
    ) -> Response | None:
        if limit_set is not None:
            limits = limit_set.degraded if degraded else limit_set.limits
            result = service.memory.check(key, limits, limit_set.costs)
            refused = self.decide(ctx, service, result, limit_set, False)
            if refused is not None or self.concurrency is None:
                return refused
        concurrency = self.local_concurrency if degraded else self.concurrency
        assert concurrency is not None
        decision, lease = service.memory.acquire(key, concurrency)
        return self.hold(ctx, service, decision, lease)

    async def check_shared(
        self,
        ctx: RequestContext,
        service: LimitService,
        key: tuple[str, ...],
        limit_set: LimitSet | None,
    ) -> Response | None:
        windows_passed = False
        try:
            if limit_set is not None:
                result = await service.check_shared(key, limit_set.limits, limit_set.costs)
                refused = self.decide(ctx, service, result, limit_set, True)
                if refused is not None or self.concurrency is None:
                    return refused
                windows_passed = True
            assert self.concurrency is not None
            decision, lease = await service.acquire_shared(
                key, self.concurrency, self.concurrency_lease_seconds
            )
        except LimiterUnavailable as exc:
            log.warning("rate limit store failed", error=str(exc), request_id=ctx.request_id)
            # Windows Redis already passed are not checked again locally.
            return self.store_down(ctx, service, key, None if windows_passed else limit_set)
        return self.hold(ctx, service, decision, lease)

    def store_down(
        self,
        ctx: RequestContext,
        service: LimitService,
        key: tuple[str, ...],
        limit_set: LimitSet | None,
    ) -> Response | None:
        mode = self.on_store_error
        if mode == "fail_open":
            service.stats.store_event("redis", "fail_open")
            return None
        if mode == "fail_closed":
            service.stats.store_event("redis", "fail_closed")
            return Response.error(
                "limiter_unavailable", ctx.request_id, headers=[(b"retry-after", b"1")]
            )
        service.stats.store_event("redis", "degraded")
        return self.check_local(ctx, service, key, limit_set, True)

    def hold(
        self,
        ctx: RequestContext,
        service: LimitService,
        decision: Decision,
        lease: Lease | RedisLease | None,
    ) -> Response | None:
        """Keep a concurrency slot for the log phase to give back, or refuse (and give
        back what the windows charged: all or nothing)."""
        held: Held | None = ctx.vars.get(VARS)
        route = ctx.route.name if ctx.route is not None else ""
        service.stats.decided(route, "concurrency", lease is not None)
        if lease is None:
            if held is not None and held.charge is not None:
                charge = held.charge
                held.charge = None
                service.refund(charge, held.shared)
            ctx.vars.pop(VARS, None)
            retry = seconds_header(decision.retry_after) if not decision.never else b"1"
            return Response.error(
                "rate_limited",
                ctx.request_id,
                "Too many requests in flight at once",
                details={"window": "concurrency", "limit": decision.limit, "remaining": 0},
                headers=[(b"retry-after", retry)],
            )
        if ctx.finished_at:
            service.release(lease)  # the client left while the store answered
            return None
        if held is None:
            held = Held(None, False)
            ctx.vars[VARS] = held
        held.lease = lease
        return None

    def decide(
        self,
        ctx: RequestContext,
        service: LimitService,
        result: LimitResult,
        limit_set: LimitSet,
        shared: bool,
    ) -> Response | None:
        if ctx.finished_at and result.charge is not None:
            # The client left while the store answered: nothing will be served.
            service.refund(result.charge, shared)
            return None
        if result.charge is not None and self.holds:
            ctx.vars[VARS] = Held(result.charge, shared)
        route = ctx.route.name if ctx.route is not None else ""
        index = window_index(result, limit_set)
        name = limit_set.names[index]
        service.stats.decided(route, name, result.allowed)
        decision = result.decision
        if self.headers:
            # Through ctx.response_headers rather than a response hook: the server
            # then appends them to the upstream's head as bytes, without parsing it.
            reset = seconds_header(decision.reset_after)
            remaining = str(decision.remaining).encode()
            extra = ctx.response_headers
            limit = self.limit_texts.get(decision.limit)
            if limit is None:
                limit = str(decision.limit).encode()
                if len(self.limit_texts) < MAX_COMPILED:
                    self.limit_texts[decision.limit] = limit
            extra.append((b"x-ratelimit-limit", limit))
            extra.append((b"x-ratelimit-remaining", remaining))
            extra.append((b"x-ratelimit-reset", reset))
            extra.append((b"ratelimit-policy", limit_set.policy))
            extra.append(
                (b"ratelimit", limit_set.quoted[index] + b";r=" + remaining + b";t=" + reset)
            )
        if result.allowed:
            return None
        details: dict[str, Any] = {
            "window": name,
            "limit": decision.limit,
            "remaining": decision.remaining,
        }
        headers: list[tuple[bytes, bytes]] = []
        if decision.never:
            message = "This request costs more than the limit allows in one window"
        else:
            message = f"Rate limit exceeded for the {name} window"
            details["retry_after"] = math.ceil(decision.retry_after - 1e-9)
            headers.append((b"retry-after", seconds_header(decision.retry_after)))
        return Response.error(
            "rate_limited", ctx.request_id, message, details=details, headers=headers
        )

    # ---- log -----------------------------------------------------------------------

    def log(self, ctx: RequestContext) -> None:
        held: Held | None = ctx.vars.get(VARS)
        if held is None:
            return
        service = self.service
        assert service is not None
        lease = held.lease
        if lease is not None:
            held.lease = None
            service.release(lease)
        charge = held.charge
        if charge is None:
            return
        status = ctx.status
        if (self.count_only_success and status >= 400) or (status in self.refund_statuses):
            held.charge = None
            service.refund(charge, held.shared)


_KINDS: Final[dict[str, int]] = {
    "ip": KEY_IP,
    "consumer": KEY_CONSUMER,
    "key": KEY_KEY,
    "route": KEY_ROUTE,
}


class SharedCheck(Deferred):
    """The windows' check in Redis, waited on without a task (gateway/context.py's
    Deferred): resolve() decides once the reply is in. Only for routes without a
    concurrency limit, whose slot is a second call after the windows pass."""

    def __init__(
        self,
        engine: RateLimitEngine,
        ctx: RequestContext,
        service: LimitService,
        key: tuple[str, ...],
        limit_set: LimitSet,
        sent: SentCheck,
    ) -> None:
        super().__init__(sent.future)
        self.engine = engine
        self.ctx = ctx
        self.service = service
        self.key = key
        self.limit_set = limit_set
        self.sent = sent

    def resolve(self) -> AccessResult:
        engine = self.engine
        ctx = self.ctx
        service = self.service
        try:
            result = service.sent_result(self.sent)
        except LimiterUnavailable as exc:
            log.warning("rate limit store failed", error=str(exc), request_id=ctx.request_id)
            return engine.store_down(ctx, service, self.key, self.limit_set)
        if result is None:  # NOSCRIPT: nothing ran; check_shared loads the script
            return engine.check_shared(ctx, service, self.key, self.limit_set)
        return engine.decide(ctx, service, result, self.limit_set, True)


def window_index(result: LimitResult, limit_set: LimitSet) -> int:
    """Which window of the set the result reports (the refusing one, else the most
    restrictive), whether the full or the degraded limits were checked."""
    decisions = result.decisions
    if len(decisions) == 1:
        return 0
    refused = result.refused_by
    if refused is not None:
        for limits in (limit_set.limits, limit_set.degraded):
            if refused in limits:
                return limits.index(refused)
    decision = result.decision
    for i in range(len(decisions)):
        if decisions[i] is decision:
            return i
    for i in range(len(decisions)):
        if decisions[i] == decision:
            return i
    return 0
