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

import re
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import AccessResult, RequestContext
from tollway.limits.windows import Per, window_bounds
from tollway.plugins.base import Plugin, PluginConfig, register
from tollway.plugins.rate_limit_engine import PERIODS, RateLimitEngine, Window, needs_log_phase

if TYPE_CHECKING:
    from tollway.config.schema import GatewayConfig
    from tollway.runtime import Runtime
    from tollway.settings import Settings

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_NAMESPACE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")


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


@register
class RateLimit(Plugin[RateLimitConfig]):
    name = "rate-limit"
    priority = 910
    Config = RateLimitConfig

    def __new__(cls, config: RateLimitConfig) -> RateLimit:
        # The pipeline calls only the hooks a class overrides: pick the variant
        # whose priority and log hook this configuration needs.
        refunds = needs_log_phase(
            config.count_only_success, config.refund_on_status, config.concurrency
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
        self._engine = RateLimitEngine(
            default_windows=tuple(Window(w.per, w.limit, w.burst, w.cost) for w in config.limits),
            key_by=config.key_by,
            namespace=config.namespace,
            algorithm=config.algorithm,
            time_zone=config.time_zone,
            cost=config.cost,
            degrade_share=config.degrade_share,
            use_key_limits=config.use_key_limits,
            headers=config.headers,
            on_store_error=config.on_store_error,
            concurrency=config.concurrency,
            concurrency_lease_seconds=config.concurrency_lease_seconds,
            count_only_success=config.count_only_success,
            refund_on_status=config.refund_on_status,
        )
        # The pipeline calls the compiled engine itself, without an interpreted frame
        # in between (the class still defines both hooks: that is what it looks for).
        self.access = self._engine.access  # type: ignore[method-assign]
        self.log = self._engine.log  # type: ignore[method-assign]

    def bind(self, runtime: Runtime) -> None:
        problem = unshared_limits_problem(runtime.settings)
        if problem is not None:
            raise ValueError(problem)
        self._engine.bind(runtime.limits, runtime.plans if self.config.use_plans else None)

    def access(self, ctx: RequestContext) -> AccessResult:
        return self._engine.access(ctx)

    def log(self, ctx: RequestContext) -> None:
        self._engine.log(ctx)


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


class _NoRefund(RateLimit):
    """rate-limit without count_only_success / refund_on_status: no log hook."""

    log = Plugin.log


class _Early(_NoRefund):
    """before_auth: ahead of key-auth (1250), behind ip-restriction and friends."""

    priority = 1260


class _EarlyRefunding(RateLimit):
    priority = 1260
