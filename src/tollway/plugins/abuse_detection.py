"""abuse-detection: temporarily ban a source that keeps getting refused (seed 004).

The log hook counts, per client IP and per consumer, the answers whose status is
in `statuses` (401, 403, 404, 429 by default: bad keys, forbidden calls, path
scans, ignored rate limits). A source with `threshold` of them within
`window_seconds` is banned for `ban_seconds` (times `ban_growth` for each further
ban within `repeat_window_seconds`, up to `max_ban_seconds`). While banned, its
requests get 403 `temporarily_blocked` with Retry-After (whole seconds left) in
the standard envelope, before they cost an upstream call. Bans end by themselves;
`/bans` on the admin API lists, adds and lifts them.

Counts and bans live in the process runtime (`Runtime.bans`), not in the plugin:
they outlive config reloads, which rebuild every plugin. With TOLLWAY_REDIS_URL
they are shared by every worker and node (limits/bans.py); without it they are
per process. The request path never waits on Redis: the ban check reads a local
table, failures are sent in the background, and a dead Redis means failures go
uncounted for a while (fail open), never a failed request.

Where the checks run. An IP ban should cost a banned client nothing: no key
lookup, so ahead of key-auth (1250). A consumer ban is known only once key-auth
has set `ctx.consumer`. One access hook cannot be in both places, so:
- `access` runs at priority 1240, right after key-auth, and checks both the IP
  and the consumer: correct with any pipeline;
- `access_ip` runs at 1300 through `extra_access` (ahead of key-auth and
  rate-limit's `before_auth` 1260), so a banned IP is refused before any key
  lookup. The second IP check at 1240 is one dict lookup.
An auth plugin below 1240 would set its consumer too late for the consumer check;
its consumers' failures are still counted, and their IP bans still apply.

`by` says which sources are counted; a ban of either kind (e.g. a manual one)
is enforced wherever this plugin is attached. `exempt_ips` / `exempt_consumers`
are never counted and never refused. The plugin's own 403s are not failures, so a
banned client that keeps calling does not lengthen its ban.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from tollway.gateway.context import RequestContext, Response
from tollway.limits.bans import MAX_VALUE_LENGTH, Ban, BanPolicy, BanStore
from tollway.plugins.addresses import Network, check_networks, client_address, parse_networks
from tollway.plugins.base import Plugin, PluginConfig, register

if TYPE_CHECKING:
    from tollway.runtime import Runtime

NAME = "abuse-detection"
# Exemption verdicts per address, as in ip-restriction: bounded.
_CACHE_SIZE = 8192
_MAPPED = "::ffff:"


def normalize_ip(ip: str) -> str:
    """The form bans are kept under: an IPv4 client of a dual-stack socket
    (`::ffff:a.b.c.d`) is its IPv4 address. Cheap: no parsing on the hot path."""
    if ip.startswith(_MAPPED) and "." in ip:
        return ip[len(_MAPPED) :]
    return ip


class AbuseDetectionConfig(PluginConfig):
    statuses: tuple[int, ...] = Field(
        default=(401, 403, 404, 429), description="answer statuses that count as failures"
    )
    threshold: int = Field(default=20, ge=1, description="failures within the window that ban")
    window_seconds: float = Field(default=60.0, gt=0, le=86400)
    ban_seconds: float = Field(default=600.0, gt=0, le=30 * 86400, description="first ban")
    ban_growth: float = Field(
        default=1.0, ge=1.0, le=100.0, description="each further ban lasts this many times longer"
    )
    max_ban_seconds: float = Field(default=86400.0, gt=0, le=30 * 86400)
    repeat_window_seconds: float = Field(
        default=86400.0, gt=0, le=30 * 86400, description="how long earlier bans are remembered"
    )
    by: tuple[Literal["ip", "consumer"], ...] = Field(
        default=("ip", "consumer"), description="which sources are counted"
    )
    exempt_ips: tuple[str, ...] = Field(default=(), description="CIDRs never counted or banned")
    exempt_consumers: tuple[str, ...] = Field(
        default=(), description="consumer ids or usernames never counted or banned"
    )

    @field_validator("statuses")
    @classmethod
    def _statuses(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v:
            raise ValueError("name at least one status")
        for status in v:
            if not 400 <= status <= 599:
                raise ValueError(f"{status} is not an error status (400-599)")
        return v

    @field_validator("by")
    @classmethod
    def _by(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("count by ip, consumer or both")
        if len(set(v)) != len(v):
            raise ValueError("each source kind once")
        return v

    @field_validator("exempt_ips")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return check_networks(v)

    @model_validator(mode="after")
    def _ban_lengths(self) -> AbuseDetectionConfig:
        if self.max_ban_seconds < self.ban_seconds:
            raise ValueError("max_ban_seconds must be at least ban_seconds")
        return self


@register
class AbuseDetection(Plugin[AbuseDetectionConfig]):
    name = NAME
    priority = 1240
    Config = AbuseDetectionConfig
    extra_access: ClassVar[tuple[tuple[str, int], ...]] = (("access_ip", 1300),)

    def __init__(self, config: AbuseDetectionConfig) -> None:
        super().__init__(config)
        self._bans: BanStore | None = None
        self._statuses = frozenset(config.statuses)
        self._by_ip = "ip" in config.by
        self._by_consumer = "consumer" in config.by
        self._exempt_nets: tuple[Network, ...] = parse_networks(config.exempt_ips)
        self._exempt_consumers = frozenset(config.exempt_consumers)
        self._exempt_cache: dict[str, bool] = {}
        self.policy = BanPolicy(
            window=config.window_seconds,
            threshold=config.threshold,
            ban_seconds=config.ban_seconds,
            growth=config.ban_growth,
            max_ban_seconds=config.max_ban_seconds,
            repeat_window=config.repeat_window_seconds,
        )

    def bind(self, runtime: Runtime) -> None:
        # getattr: the field is the runtime's; without it the plugin does nothing.
        self._bans = getattr(runtime, "bans", None)

    def use_store(self, bans: BanStore | None) -> None:
        """Give the plugin a store directly (tests, embedding)."""
        self._bans = bans

    # ---- exemptions ---------------------------------------------------------------

    def ip_exempt(self, ip: str) -> bool:
        if not self._exempt_nets:
            return False
        verdict = self._exempt_cache.get(ip)
        if verdict is None:
            addr = client_address(ip)
            verdict = addr is not None and any(addr in net for net in self._exempt_nets)
            if len(self._exempt_cache) >= _CACHE_SIZE:
                del self._exempt_cache[next(iter(self._exempt_cache))]
            self._exempt_cache[ip] = verdict
        return verdict

    def _consumer_ref(self, consumer: Any) -> str | None:
        """The value a consumer is counted and banned under (its id), or None when
        it has none or is exempt."""
        ref = getattr(consumer, "id", None)
        if ref is None:
            ref = getattr(consumer, "username", None)
            if ref is None:
                return None
        ref = str(ref)
        if self._exempt_consumers and (
            ref in self._exempt_consumers
            or str(getattr(consumer, "username", None)) in self._exempt_consumers
        ):
            return None
        return ref

    # ---- access -------------------------------------------------------------------

    def access_ip(self, ctx: RequestContext) -> Response | None:
        bans = self._bans
        if bans is None or not bans.active:  # nobody is banned: the usual case
            return None
        ip = normalize_ip(ctx.client_ip)
        ban = bans.banned("ip", ip)
        if ban is None or self.ip_exempt(ip):
            return None
        return self._refuse(ctx, ban, bans)

    def access(self, ctx: RequestContext) -> Response | None:
        bans = self._bans
        if bans is None or not bans.active:  # nobody is banned: the usual case
            return None
        ip = normalize_ip(ctx.client_ip)
        ban = bans.banned("ip", ip)
        if ban is not None and not self.ip_exempt(ip):
            return self._refuse(ctx, ban, bans)
        consumer = ctx.consumer
        if consumer is not None:
            ref = self._consumer_ref(consumer)
            if ref is not None:
                ban = bans.banned("consumer", ref)
                if ban is not None:
                    return self._refuse(ctx, ban, bans)
        return None

    def _refuse(self, ctx: RequestContext, ban: Ban, bans: BanStore) -> Response:
        # Marks this request's 403 as ours: the log hook must not count it.
        ctx.vars[NAME] = ban.kind
        bans.blocked(ban.kind)
        retry = ban.retry_after(bans.clock())
        return Response.error(
            "temporarily_blocked",
            ctx.request_id,
            details={"kind": ban.kind, "retry_after": retry},
            headers=[(b"retry-after", str(retry).encode())],
        )

    # ---- log ----------------------------------------------------------------------

    def log(self, ctx: RequestContext) -> None:
        if ctx.status not in self._statuses:
            return
        bans = self._bans
        if bans is None or NAME in ctx.vars:
            return
        if self._by_ip:
            ip = normalize_ip(ctx.client_ip)
            if ip and len(ip) <= MAX_VALUE_LENGTH and not self.ip_exempt(ip):
                bans.failed("ip", ip, self.policy)
        if self._by_consumer and ctx.consumer is not None:
            ref = self._consumer_ref(ctx.consumer)
            if ref is not None and len(ref) <= MAX_VALUE_LENGTH:
                bans.failed("consumer", ref, self.policy)
