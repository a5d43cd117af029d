"""What the exchange asks between upstream attempts: which key to hash, whether to retry.

Kept out of exchange.py so that the exchange stays the state machine of one request
and these rules (RFC 9110's idempotency, the route's overrides, the budget) read in
one place.
"""

from __future__ import annotations

from http.cookies import CookieError, SimpleCookie
from typing import TYPE_CHECKING

from tollway.gateway.context import RequestContext, Response, header_get
from tollway.upstream.errors import (
    PoolExhausted,
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamError,
)
from tollway.upstream.health import Outcome
from tollway.upstream.retry import may_retry_method

if TYPE_CHECKING:
    from tollway.upstream.cluster import Cluster, Refusal

# Request bodies up to this size are kept for a replay on another target; a longer
# one streams through unkept, and its request is retried only when no attempt got
# as far as sending (a refused connect: the body is still all in the buffer).
REPLAY_LIMIT = 64 * 1024


def hash_key(ctx: RequestContext, spec: str | None) -> bytes | None:
    """The consistent-hash key of a request: header:<name>, cookie:<name>, consumer, ip.

    None (a missing header or cookie) lets the balancer fall back to round robin; a
    request without a consumer hashes on its client IP, so it still sticks.
    """
    if spec is None:
        return None
    if spec == "ip":
        return ctx.client_ip.encode()
    if spec == "consumer":
        consumer = ctx.consumer
        if consumer is None:
            return ctx.client_ip.encode()
        return str(getattr(consumer, "id", consumer)).encode()
    kind, _, name = spec.partition(":")
    if kind == "header":
        return header_get(ctx.headers, name.lower().encode())
    raw = header_get(ctx.headers, b"cookie")
    if raw is None:
        return None
    try:
        jar = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = jar.get(name)
    return morsel.value.encode() if morsel is not None else None


def error_outcome(exc: UpstreamError) -> Outcome | None:
    """How an attempt's error counts against its target; None: not the target's fault."""
    if isinstance(exc, PoolExhausted):
        return None  # our own connection cap, not the target
    if isinstance(exc, UpstreamConnectTimeout) or exc.code == "upstream_timeout":
        return Outcome.TIMEOUT
    return Outcome.CONNECT_FAILURE


def retry_reason(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamConnectError):
        return "timeout" if isinstance(exc, UpstreamConnectTimeout) else "connect_failure"
    if exc.code == "upstream_timeout":
        return "timeout"
    return "reset"


def may_retry(
    ctx: RequestContext,
    cluster: Cluster,
    attempt: int,
    reason: str,
    sent: bool,
    replayable: bool,
) -> bool:
    """Whether the failed attempt `attempt` may be tried again, budget aside.

    `sent`: the upstream may have seen the request (anything after the connect), so
    only a method that may be repeated is retried: POST without an Idempotency-Key
    never reaches an upstream twice.
    """
    policy = cluster.config.retries
    route = ctx.route
    override = route.config.retries if route is not None else None
    attempts = policy.attempts
    non_idempotent = policy.non_idempotent
    if override is not None:
        if override.attempts is not None:
            attempts = override.attempts
        if override.non_idempotent is not None:
            non_idempotent = override.non_idempotent
    if attempt >= attempts or (sent and not replayable):
        return False
    if reason == "timeout" and not policy.on_timeout:
        return False
    if reason in ("connect_failure", "reset") and not policy.on_connect_failure:
        return False
    if not sent:
        return True
    has_key = header_get(ctx.headers, b"idempotency-key") is not None
    return may_retry_method(ctx.method, has_key, non_idempotent)


def refusal_response(refusal: Refusal, ctx: RequestContext, service: str) -> Response:
    headers = []
    if refusal.retry_after:
        headers.append((b"retry-after", str(max(1, round(refusal.retry_after))).encode()))
    return Response.error(
        refusal.code, ctx.request_id, details={"service": service}, headers=headers
    )
