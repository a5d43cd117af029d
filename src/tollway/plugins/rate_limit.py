"""rate-limit: exact rate limits and quotas per IP, consumer, key, route or header.

Priority 910 (Kong's rate-limiting figure): after key-auth (1250), so that the
consumer and the key are known, and before the upstream is called. With
`before_auth: true` it runs at 1260 instead, ahead of authentication (keyed by IP
or header only), so that a flood of bad keys is limited before it reaches the key
store; `count_only_success` / `refund_on_status` then give back what a request
that auth refused was charged.

Which limits apply to a request, most specific first:
1. the key's own `limit_per_minute` / `limit_per_day` (seed 002), replacing the
   minute / day window of what follows (or adding one);
2. the consumer's plan (`/plans`), when it has one that exists;
3. this plugin's `limits`.
Then the consumer's active burst grants raise the windows they name until they
expire. Day and month windows are calendar quotas (local midnight / the first of
the month in `time_zone`) counted in a fixed window, whatever `algorithm` says;
second, minute and hour windows use `algorithm` (GCRA by default, whose `burst`
lets a client spend up to that many at once).

Counters are named by `namespace`, the `key_by` values and the window (see
limits.multi.slot_id): the same consumer limited on two routes shares its counter
unless `route` is in `key_by` or the namespaces differ. A key_by part the request
does not have (no consumer, no such header) falls back to the client IP, so an
anonymous request never shares one counter with every other anonymous request.

Every limited response (the upstream's or a refusal) carries
X-RateLimit-Limit/-Remaining/-Reset and the IETF
RateLimit-Policy / RateLimit fields (draft-ietf-httpapi-ratelimit-headers) of the
most restrictive window; a refusal is 429 `rate_limited` with Retry-After and the
window that refused. A refused request consumes nothing.

The store is the process's (Runtime.limits): memory, or Redis when
TOLLWAY_REDIS_URL is set. When Redis fails: `fail_open` lets the request through
unlimited (counted in tollway_limiter_store_events_total), `fail_closed` answers
503 `limiter_unavailable`, `degrade_to_local` counts in this process with
`degrade_share` of each limit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import structlog
from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import RequestContext, Response
from tollway.limits.concurrency import Concurrency
from tollway.limits.decision import Decision
from tollway.limits.errors import LimiterUnavailable
from tollway.limits.gcra import Gcra
from tollway.limits.memory import Charge, Lease, LimitResult
from tollway.limits.multi import Limit, Windows
from tollway.limits.service import LimitService, scaled
from tollway.limits.windows import PERS, FixedWindow, Per, SlidingWindow, window_bounds
from tollway.plugins.base import AccessResult, Plugin, PluginConfig, register

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.limits.plans import PlanBook
    from tollway.limits.redis_store import RedisLease
    from tollway.runtime import Runtime
    from tollway.settings import Settings

log = structlog.get_logger("tollway.rate_limit")

PERIODS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0}
# Nominal lengths for RateLimit-Policy's w= of calendar windows.
NOMINAL: dict[str, int] = {
    "second": 1, "minute": 60, "hour": 3600, "day": 86400, "month": 2592000,
}  # fmt: skip
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
VARS = "rate-limit"
# Distinct limit sets a plugin remembers (one per plan/override/grant mix seen).
MAX_COMPILED = 4096


class WindowConfig(PluginConfig):
    per: Per = Field(description="second | minute | hour | day | month")
    limit: int = Field(ge=1, description="requests (or cost units) per window")
    burst: int | None = Field(
        default=None, ge=1, description="GCRA only: at most this many at once (default: limit)"
    )
    cost: int | None = Field(
        default=None, ge=0, description="what one request counts in this window (default: cost)"
    )

    @model_validator(mode="after")
    def _burst_where_it_means_something(self) -> WindowConfig:
        if self.burst is not None and self.per not in PERIODS:
            raise ValueError("burst applies to second, minute and hour windows only")
        return self


_KEY_KINDS = ("ip", "consumer", "key", "route")


def _key_part(value: str) -> str:
    if value in _KEY_KINDS:
        return value
    if value.startswith("header:") and _HEADER_NAME.match(value[7:]):
        return "header:" + value[7:].lower()
    raise ValueError(f"{value!r}: use ip, consumer, key, route or header:<Header-Name>")


class RateLimitConfig(PluginConfig):
    limits: tuple[WindowConfig, ...] = Field(
        default=(), description="the route's windows (a plan or a key may replace them)"
    )
    key_by: tuple[str, ...] = Field(
        default=("consumer",), description="ip | consumer | key | route | header:X-Name, or a list"
    )
    algorithm: Literal["gcra", "sliding_window", "fixed_window"] = "gcra"
    time_zone: str = Field(default="UTC", description="IANA zone of day and month windows")
    cost: int = Field(default=1, ge=0, description="what one request on this route counts")
    namespace: str = Field(default="default", description="separates counters of attachments")
    use_plans: bool = Field(default=True, description="a consumer's plan replaces `limits`")
    use_key_limits: bool = Field(
        default=True, description="a key's limit_per_minute / limit_per_day override"
    )
    count_only_success: bool = Field(
        default=False, description="give back the charge when the answer is 400 or above"
    )
    refund_on_status: tuple[int, ...] = Field(
        default=(), description="give back the charge when the answer has one of these"
    )
    on_store_error: Literal["fail_open", "fail_closed", "degrade_to_local"] = "fail_open"
    degrade_share: float = Field(
        default=1.0, gt=0, le=1, description="share of each limit one node allows when degraded"
    )
    before_auth: bool = Field(
        default=False, description="run before authentication (key_by ip/header/route only)"
    )
    headers: bool = Field(default=True, description="send the X-RateLimit-* and RateLimit fields")
    concurrency: int | None = Field(
        default=None, ge=1, description="at most this many requests in flight per key"
    )
    concurrency_lease_seconds: float = Field(
        default=300.0,
        gt=0,
        description="with Redis, a slot a crashed node never gave back frees itself after this",
    )

    @field_validator("key_by", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return (v,) if isinstance(v, str) else v

    @field_validator("key_by")
    @classmethod
    def _key_by(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("name at least one of ip, consumer, key, route, header:<Name>")
        parts = tuple(_key_part(p) for p in v)
        if len(set(parts)) != len(parts):
            raise ValueError("a key_by part is repeated")
        return parts

    @field_validator("refund_on_status")
    @classmethod
    def _statuses(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for status in v:
            if not 100 <= status <= 599:
                raise ValueError(f"{status} is not an HTTP status")
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: str) -> str:
        if not _NAMESPACE.match(v):
            raise ValueError("1-64 letters, digits and _.:-")
        return v

    @field_validator("time_zone")
    @classmethod
    def _zone(cls, v: str) -> str:
        try:
            window_bounds(0.0, "day", v)
        except (ValueError, KeyError) as exc:  # ZoneInfoNotFoundError is a KeyError
            raise ValueError(f"unknown time zone {v!r}") from exc
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RateLimitConfig:
        pers = [w.per for w in self.limits]
        if len(set(pers)) != len(pers):
            raise ValueError("at most one window per `per` (second, minute, hour, day, month)")
        if (
            not self.limits
            and not self.use_plans
            and not self.use_key_limits
            and self.concurrency is None
        ):
            raise ValueError("give `limits` or `concurrency`, or let plans or key limits decide")
        if self.before_auth and {"consumer", "key"} & set(self.key_by):
            raise ValueError("before_auth cannot key by consumer or key: nobody is known yet")
        return self


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
    ordered = sorted(windows, key=lambda w: PERS.index(w.per))
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
    names = tuple(w.per for w in ordered)
    policy = ", ".join(
        f'"{name}";q={_capacity(limit)};w={NOMINAL[name]}'
        for name, limit in zip(names, limits, strict=True)
    ).encode()
    return LimitSet(
        limits=Windows(limits),  # raises when two windows would share a counter
        costs=tuple(cost if w.cost is None else w.cost for w in ordered),
        names=names,
        policy=policy,
        quoted=tuple(b'"' + name.encode() + b'"' for name in names),
        degraded=Windows([scaled(limit, share) for limit in limits]),
    )


def _capacity(limit: Limit) -> int:
    return limit.capacity if isinstance(limit, Gcra) else limit.limit


def _seconds(value: float) -> bytes:
    """Whole seconds for a header, rounded up (a client that waits that long passes)."""
    return str(max(0, math.ceil(value - 1e-9))).encode()


class _Held:
    """What access leaves for the response and log phases."""

    __slots__ = ("charge", "lease", "result", "set", "shared")

    def __init__(self, result: LimitResult | None, set_: LimitSet | None, shared: bool) -> None:
        self.result = result
        self.set = set_
        self.charge: Charge | None = None if result is None else result.charge
        self.shared = shared
        self.lease: Lease | RedisLease | None = None


@register
class RateLimit(Plugin[RateLimitConfig]):
    name = "rate-limit"
    priority = 910
    Config = RateLimitConfig

    def __new__(cls, config: RateLimitConfig) -> RateLimit:
        # The pipeline calls only the hooks a class overrides: pick the variant
        # whose priority and log hook this configuration needs.
        refunds = (
            config.count_only_success
            or bool(config.refund_on_status)
            or config.concurrency is not None  # the log phase gives the slot back
        )
        if cls is RateLimit:
            if config.before_auth:
                kind: type[RateLimit] = _EarlyRefunding if refunds else _Early
            else:
                kind = RateLimit if refunds else _NoRefund
        else:
            kind = cls
        return super().__new__(kind)

    def __init__(self, config: RateLimitConfig) -> None:
        super().__init__(config)
        self._service: LimitService | None = None
        self._plans: PlanBook | None = None
        self._default_windows = tuple(
            Window(w.per, w.limit, w.burst, w.cost) for w in config.limits
        )
        self._default = self._compile(self._default_windows)
        self._compiled: dict[tuple[object, ...], LimitSet | None] = {}
        self._key_getters: tuple[Callable[[RequestContext], str], ...] = tuple(
            _getter(part) for part in config.key_by
        )
        self._namespace = config.namespace
        self._refund_statuses = frozenset(config.refund_on_status)
        self._concurrency = None if config.concurrency is None else Concurrency(config.concurrency)
        self._local_concurrency = (
            None
            if config.concurrency is None
            else Concurrency(max(1, math.floor(config.concurrency * config.degrade_share)))
        )

    def bind(self, runtime: Runtime) -> None:
        problem = unshared_limits_problem(runtime.settings)
        if problem is not None:
            raise ValueError(problem)
        self._service = runtime.limits
        self._plans = runtime.plans if self.config.use_plans else None

    def _compile(self, windows: tuple[Window, ...]) -> LimitSet | None:
        c = self.config
        return compile_windows(windows, c.algorithm, c.time_zone, c.cost, c.degrade_share)

    # ---- which limits ------------------------------------------------------------

    def _limit_set(self, ctx: RequestContext) -> LimitSet | None:
        consumer = ctx.consumer
        credential = ctx.credential
        plans = self._plans
        plan = None
        grants: tuple[Any, ...] = ()
        if consumer is not None and plans is not None and plans.populated:
            plan_name = getattr(consumer, "plan", None)
            if plan_name:
                plan = plans.plan(plan_name)
            grants = plans.grants(str(consumer.id), ctx.started_at)
        per_minute = per_day = None
        if credential is not None and self.config.use_key_limits:
            per_minute = getattr(credential, "limit_per_minute", None)
            per_day = getattr(credential, "limit_per_day", None)
        if plan is None and not grants and per_minute is None and per_day is None:
            return self._default
        memo = (plan, per_minute, per_day, tuple((g.per, g.extra) for g in grants))
        found = self._compiled.get(memo, _MISSING)
        if found is not _MISSING:
            return found  # type: ignore[return-value]
        windows: dict[str, Window] = {
            w.per: Window(w.per, w.limit, w.burst, w.cost)
            for w in (plan.limits if plan is not None else self._default_windows)
        }
        for per, value in (("minute", per_minute), ("day", per_day)):
            if value is not None:
                old = windows.get(per)
                windows[per] = Window(per, value, None, None if old is None else old.cost)  # type: ignore[arg-type]
        for grant in grants:
            w = windows.get(grant.per)
            if w is None:
                continue
            if w.per in PERIODS and self.config.algorithm == "gcra":
                windows[w.per] = Window(w.per, w.limit, (w.burst or w.limit) + grant.extra, w.cost)
            else:
                windows[w.per] = Window(w.per, w.limit + grant.extra, w.burst, w.cost)
        compiled = self._compile(tuple(windows.values()))
        if len(self._compiled) >= MAX_COMPILED:
            self._compiled.clear()
        self._compiled[memo] = compiled
        return compiled

    def _key(self, ctx: RequestContext) -> tuple[str, ...]:
        return (self._namespace, *(get(ctx) for get in self._key_getters))

    # ---- access ------------------------------------------------------------------

    def access(self, ctx: RequestContext) -> AccessResult:
        service = self._service
        if service is None:  # never bound: not a running gateway
            return Response.error("limiter_unavailable", ctx.request_id)
        limit_set = self._limit_set(ctx)
        if limit_set is None and self._concurrency is None:
            return None  # nothing limits this request (no windows anywhere)
        key = self._key(ctx)
        if service.redis is None:
            return self._check_local(ctx, key, limit_set, degraded=False)
        if not service.store_ready():
            return self._store_down(ctx, key, limit_set)
        return self._check_shared(ctx, service, key, limit_set)

    def _check_local(
        self, ctx: RequestContext, key: tuple[str, ...], limit_set: LimitSet | None, degraded: bool
    ) -> Response | None:
        service = self._service
        assert service is not None
        if limit_set is not None:
            limits = limit_set.degraded if degraded else limit_set.limits
            result = service.memory.check(key, limits, limit_set.costs)
            refused = self._decide(ctx, result, limit_set, False)
            if refused is not None or self._concurrency is None:
                return refused
        concurrency = self._local_concurrency if degraded else self._concurrency
        assert concurrency is not None
        decision, lease = service.memory.acquire(key, concurrency)
        return self._hold(ctx, decision, lease)

    async def _check_shared(
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
                refused = self._decide(ctx, result, limit_set, True)
                if refused is not None or self._concurrency is None:
                    return refused
                windows_passed = True
            assert self._concurrency is not None
            decision, lease = await service.acquire_shared(
                key, self._concurrency, self.config.concurrency_lease_seconds
            )
        except LimiterUnavailable as exc:
            log.warning("rate limit store failed", error=str(exc), request_id=ctx.request_id)
            # Windows Redis already passed are not checked again locally.
            return self._store_down(ctx, key, None if windows_passed else limit_set)
        return self._hold(ctx, decision, lease)

    def _store_down(
        self, ctx: RequestContext, key: tuple[str, ...], limit_set: LimitSet | None
    ) -> Response | None:
        service = self._service
        assert service is not None
        mode = self.config.on_store_error
        if mode == "fail_open":
            service.stats.store_event("redis", "fail_open")
            return None
        if mode == "fail_closed":
            service.stats.store_event("redis", "fail_closed")
            return Response.error(
                "limiter_unavailable", ctx.request_id, headers=[(b"retry-after", b"1")]
            )
        service.stats.store_event("redis", "degraded")
        return self._check_local(ctx, key, limit_set, degraded=True)

    def _hold(
        self, ctx: RequestContext, decision: Decision, lease: Lease | RedisLease | None
    ) -> Response | None:
        """Keep a concurrency slot for the log phase to give back, or refuse (and give
        back what the windows charged: all or nothing)."""
        service = self._service
        assert service is not None
        held: _Held | None = ctx.vars.get(VARS)
        route = ctx.route.name if ctx.route is not None else ""
        service.stats.decided(route, "concurrency", lease is not None)
        if lease is None:
            if held is not None and held.charge is not None:
                charge, held.charge = held.charge, None
                service.refund(charge, held.shared)
            ctx.vars.pop(VARS, None)
            retry = _seconds(decision.retry_after) if not decision.never else b"1"
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
            held = ctx.vars[VARS] = _Held(None, None, False)
        held.lease = lease
        return None

    def _decide(
        self, ctx: RequestContext, result: LimitResult, limit_set: LimitSet, shared: bool
    ) -> Response | None:
        held = _Held(result, limit_set, shared)
        if ctx.finished_at and result.charge is not None:
            # The client left while the store answered: nothing will be served.
            self._service.refund(result.charge, shared)  # type: ignore[union-attr]
            return None
        ctx.vars[VARS] = held
        stats = self._service.stats  # type: ignore[union-attr]
        route = ctx.route.name if ctx.route is not None else ""
        index = _window_index(result, limit_set)
        stats.decided(route, limit_set.names[index], result.allowed)
        if self.config.headers:
            # Through ctx.response_headers rather than a response hook: the server
            # then appends them to the upstream's head as bytes, without parsing it.
            decision = result.decision
            reset = _seconds(decision.reset_after)
            remaining = str(decision.remaining).encode()
            ctx.response_headers += (
                (b"x-ratelimit-limit", str(decision.limit).encode()),
                (b"x-ratelimit-remaining", remaining),
                (b"x-ratelimit-reset", reset),
                (b"ratelimit-policy", limit_set.policy),
                (b"ratelimit", limit_set.quoted[index] + b";r=" + remaining + b";t=" + reset),
            )
        if result.allowed:
            return None
        decision = result.decision
        details: dict[str, Any] = {
            "window": limit_set.names[index],
            "limit": decision.limit,
            "remaining": decision.remaining,
        }
        headers: list[tuple[bytes, bytes]] = []
        if decision.never:
            message = "This request costs more than the limit allows in one window"
        else:
            message = f"Rate limit exceeded for the {limit_set.names[index]} window"
            details["retry_after"] = math.ceil(decision.retry_after - 1e-9)
            headers.append((b"retry-after", _seconds(decision.retry_after)))
        return Response.error(
            "rate_limited", ctx.request_id, message, details=details, headers=headers
        )

    # ---- response and log ----------------------------------------------------------

    def log(self, ctx: RequestContext) -> None:
        held: _Held | None = ctx.vars.get(VARS)
        if held is None:
            return
        service = self._service
        assert service is not None
        if held.lease is not None:
            lease, held.lease = held.lease, None
            service.release(lease)
        if held.charge is None:
            return
        status = ctx.status
        if (self.config.count_only_success and status >= 400) or (status in self._refund_statuses):
            charge, held.charge = held.charge, None
            service.refund(charge, held.shared)


def unshared_limits_problem(settings: Settings) -> str | None:
    """Why rate limits cannot be exact with these settings, or None.

    Without Redis each worker counts alone, so N workers would allow N times every
    limit: refused unless the operator asked for per-worker limits explicitly.
    """
    if settings.workers > 1 and not settings.redis_url and not settings.per_worker_limits:
        return (
            f"rate-limit with --workers {settings.workers} needs a shared store: set "
            "TOLLWAY_REDIS_URL, or run one worker, or accept per-worker limits "
            "(each worker allowing the whole limit) with --per-worker-limits / "
            "TOLLWAY_PER_WORKER_LIMITS=true"
        )
    return None


def config_uses_rate_limits(config: GatewayConfig) -> bool:
    return any(p.name == RateLimit.name and p.enabled for p in config.plugins)


def _window_index(result: LimitResult, limit_set: LimitSet) -> int:
    """Which window of the set the result reports (the refusing one, else the most
    restrictive), whether the full or the degraded limits were checked."""
    refused = result.refused_by
    if refused is not None:
        for limits in (limit_set.limits, limit_set.degraded):
            if refused in limits:
                return limits.index(refused)
    decision = result.decision
    for i, d in enumerate(result.decisions):
        if d is decision:
            return i
    for i, d in enumerate(result.decisions):
        if d == decision:
            return i
    return 0


class _NoRefund(RateLimit):
    """rate-limit without count_only_success / refund_on_status: no log hook."""

    log = Plugin.log


class _Early(_NoRefund):
    """before_auth: ahead of key-auth (1250), behind ip-restriction and friends."""

    priority = 1260


class _EarlyRefunding(RateLimit):
    priority = 1260


_MISSING = object()


def _getter(part: str) -> Callable[[RequestContext], str]:
    """A function giving the key value of `part` for a request (IP when absent)."""
    if part == "ip":
        return lambda ctx: "ip=" + ctx.client_ip
    if part == "route":
        return lambda ctx: "route=" + (ctx.route.name if ctx.route is not None else "")
    if part == "consumer":

        def consumer(ctx: RequestContext) -> str:
            who = ctx.consumer
            return "consumer=" + str(who.id) if who is not None else "ip=" + ctx.client_ip

        return consumer
    if part == "key":

        def key(ctx: RequestContext) -> str:
            cred = ctx.credential
            key_id = getattr(cred, "key_id", None) if cred is not None else None
            return "key=" + str(key_id) if key_id is not None else "ip=" + ctx.client_ip

        return key
    name = part[7:].encode()

    def header(ctx: RequestContext) -> str:
        value = ctx.header(name)
        if value is None:
            return "ip=" + ctx.client_ip
        return "header=" + value.decode("latin-1")

    return header
