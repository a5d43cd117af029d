"""The upstream half of a service's config: balancing, health, breakers, retries, discovery.

Defaults are what a production gateway should do with no settings at all: passive
outlier detection and circuit breakers on, three attempts for idempotent requests on
connect failures, timeouts and 502/503/504, a 20 % retry budget. Active health
checks need a path the upstream serves, so they are off until one is named.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from tollway.config.schema_base import Duration, Model

Balancer = Literal[
    "round_robin",
    "weighted_round_robin",
    "least_connections",
    "random",
    "power_of_two",
    "consistent_hash",
]
# header:<name> | cookie:<name> | consumer | ip
_HASH_ON = re.compile(r"^(?:header:[!#$%&'*+.^_`|~0-9A-Za-z-]+|cookie:[^\s;=,]+|consumer|ip)$")
# Statuses are numbers from 100 to 599.
Status = Field(ge=100, le=599)


class ActiveHealthCheck(Model):
    """The gateway asks every target on its own: GET `path` each `interval`."""

    path: str = "/health"
    interval: Duration = 5.0
    timeout: Duration = 1.0
    # Consecutive results that flip a target's state.
    healthy_threshold: int = Field(default=2, ge=1, le=100)
    unhealthy_threshold: int = Field(default=3, ge=1, le=100)
    # Empty: any 2xx or 3xx is healthy.
    expected_statuses: tuple[int, ...] = ()
    # The Host header of the check; the target's host:port when unset.
    host: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not v.startswith("/") or any(c in v for c in " \r\n\t"):
            raise ValueError('must start with "/" and hold no whitespace')
        return v

    @field_validator("expected_statuses")
    @classmethod
    def _statuses(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        for i, s in enumerate(v):
            if not 100 <= s <= 599:
                raise ValueError(f"expected_statuses[{i}]: not an HTTP status")
        return v

    @field_validator("host")
    @classmethod
    def _host(cls, v: str | None) -> str | None:
        if v is not None and (not v.isascii() or any(c in v for c in " \r\n\t\0")):
            raise ValueError("must be a host name (ASCII, no whitespace)")
        return v

    @model_validator(mode="after")
    def _timeout_below_interval(self) -> ActiveHealthCheck:
        if self.interval <= 0:
            raise ValueError("interval must be above zero")
        if self.timeout <= 0 or self.timeout > self.interval:
            raise ValueError("timeout must be above zero and at most the interval")
        return self


class PassiveHealthCheck(Model):
    """Outlier detection from real traffic (Envoy's names and behaviour).

    A target that fails `consecutive_5xx` responses or `consecutive_failures` connects
    or timeouts in a row is ejected for base_ejection_time times the number of its
    ejections so far (capped by max_ejection_time); it comes back by itself.
    """

    consecutive_5xx: int = Field(default=5, ge=0, description="0 turns this count off")
    consecutive_failures: int = Field(default=3, ge=0, description="connect failures, timeouts")
    base_ejection_time: Duration = 10.0
    max_ejection_time: Duration = 300.0
    # At most this share of a service's targets is ejected at once (rounded down, but
    # one target of a service of two or more may always go).
    max_ejection_percent: int = Field(default=50, ge=0, le=100)

    @model_validator(mode="after")
    def _max_above_base(self) -> PassiveHealthCheck:
        if self.max_ejection_time < self.base_ejection_time:
            raise ValueError("max_ejection_time must be at least base_ejection_time")
        return self


class HealthChecks(Model):
    active: ActiveHealthCheck | None = None
    passive: PassiveHealthCheck | None = PassiveHealthCheck()


class CircuitBreakerConfig(Model):
    """closed -> open after failures -> half-open after open_time -> closed after successes.

    One breaker per target and one per service, with these settings. A failure is a
    connect failure, a timeout or a status in failure_statuses.
    """

    enabled: bool = True
    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures")
    # Also open when at least min_requests ended in `window` and this share failed.
    failure_rate: float | None = Field(default=0.5, gt=0, le=1)
    window: Duration = 10.0
    min_requests: int = Field(default=20, ge=1)
    open_time: Duration = 5.0
    half_open_successes: int = Field(default=2, ge=1)
    half_open_probes: int = Field(default=1, ge=1)
    # 500 is left out by default: it is often one request's bug, not a sick target
    # (passive health checks still count every 5xx).
    failure_statuses: tuple[int, ...] = (502, 503, 504)

    @model_validator(mode="after")
    def _positive_times(self) -> CircuitBreakerConfig:
        if self.window <= 0 or self.open_time <= 0:
            raise ValueError("window and open_time must be above zero")
        return self


class RetryConfig(Model):
    """Another attempt, on another target when there is one, for what failed safely."""

    # Tries in all, the first included: 1 turns retries off.
    attempts: int = Field(default=3, ge=1, le=10)
    on_statuses: tuple[int, ...] = (502, 503, 504)
    on_connect_failure: bool = True
    on_timeout: bool = True
    # POST, PATCH and other non-idempotent methods are retried only with this set (or
    # when the request carries an Idempotency-Key).
    non_idempotent: bool = False
    # Full jitter: retry n waits uniform in [0, min(backoff_max, backoff_base * 2^(n-1))].
    backoff_base: Duration = 0.025
    backoff_max: Duration = 0.25
    # Retries at most budget_ratio of the requests of the last budget_window, plus
    # budget_min_per_second (so that a quiet service may still retry).
    budget_ratio: float = Field(default=0.2, ge=0, le=1)
    budget_min_per_second: float = Field(default=5.0, ge=0)
    budget_window: Duration = 10.0

    @model_validator(mode="after")
    def _sane(self) -> RetryConfig:
        if self.budget_window <= 0:
            raise ValueError("budget_window must be above zero")
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be at least backoff_base")
        return self


class RouteRetryConfig(Model):
    """A route may narrow or widen its service's retries."""

    attempts: int | None = Field(default=None, ge=1, le=10)
    non_idempotent: bool | None = None


class DnsDiscovery(Model):
    """Targets from DNS: A/AAAA records of `name` on `port`, or SRV records of `srv`."""

    name: str | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    srv: str | None = None
    # Re-resolved when the records' TTL ends, within these bounds.
    min_ttl: Duration = 1.0
    max_ttl: Duration = 300.0
    # host:port of the resolvers to ask; the system's (/etc/resolv.conf) when empty.
    nameservers: tuple[str, ...] = ()
    weight: int = Field(default=100, ge=0, le=65535)

    @model_validator(mode="after")
    def _one_kind(self) -> DnsDiscovery:
        if (self.name is None) == (self.srv is None):
            raise ValueError("give exactly one of name (with port) or srv")
        if self.name is not None and self.port is None:
            raise ValueError("name needs a port")
        if self.srv is not None and self.port is not None:
            raise ValueError("srv records carry their own ports: no port here")
        return self


def check_hash_on(v: str | None) -> str | None:
    if v is not None and not _HASH_ON.match(v):
        raise ValueError('must be "header:<name>", "cookie:<name>", "consumer" or "ip"')
    return v
