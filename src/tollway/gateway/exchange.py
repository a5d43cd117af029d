"""One request through the data plane: route, access phase, upstream, response, log.

The exchange is driven by callbacks from the two sockets rather than by a
coroutine: on a warm keep-alive request with synchronous plugins no task is
created at all. It drops into a coroutine only to wait (a plugin's awaitable, a
new upstream connection).

Body bytes stream both ways as they arrive; back-pressure pauses the reading side
when the writing side's buffer is full. A request body is buffered only while no
upstream connection is attached yet, and reading pauses past BODY_BUFFER bytes.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

import structlog

from tollway.gateway.attempts import (
    REPLAY_LIMIT,
    error_outcome,
    hash_key,
    may_retry,
    refusal_response,
    retry_reason,
)
from tollway.gateway.context import (
    AccessResult,
    Deferred,
    Headers,
    RequestContext,
    Response,
    ResponseHead,
    header_get,
)
from tollway.gateway.errors import GatewayError
from tollway.gateway.framing import (
    DOWNSTREAM_HOPS,
    NO_BODY_STATUS,
    UPSTREAM_HOPS,
    drop_header_lines,
    raw_response_head,
    request_head,
    response_framing,
)
from tollway.gateway.http11 import DATE, HOP_BY_HOP, render_head
from tollway.gateway.pipeline import Chain, FilterChain, active_chain
from tollway.upstream.cluster import Refusal
from tollway.upstream.errors import UpstreamError, UpstreamReadTimeout, UpstreamWriteTimeout
from tollway.upstream.health import Outcome
from tollway.upstream.retry import backoff_delay, may_retry_method
from tollway.upstream.service import Timeouts

if TYPE_CHECKING:
    from tollway.config.snapshot import Snapshot
    from tollway.gateway.server import ClientConnection
    from tollway.upstream.cluster import Cluster, Host
    from tollway.upstream.connection import UpstreamConnection
    from tollway.upstream.pool import ConnectionPool
    from tollway.upstream.service import Service

log = structlog.get_logger("tollway.exchange")

BODY_BUFFER = 64 * 1024
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
DEFAULT_TIMEOUTS = Timeouts(connect=5.0, write=60.0, read=60.0)


class Exchange:
    __slots__ = (
        "attempt",
        "body_buf",
        "body_buf_size",
        "body_received",
        "chain",
        "close_after",
        "cluster",
        "conn",
        "connection",
        "ctx",
        "deadline",
        "deferred",
        "expect_continue",
        "filters",
        "finished",
        "host",
        "keep_alive",
        "out",
        "outcome_done",
        "pool",
        "preset",
        "replay",
        "replay_size",
        "request_done",
        "resp_chunked",
        "resp_connection",
        "response_started",
        "retried",
        "retry_timer",
        "reused",
        "service",
        "service_failed",
        "settled",
        "snapshot",
        "timeouts",
        "tried",
        "upgrade",
        "upgrade_tail",
        "upstream",
        "upstream_path",
        "upstream_sent_all",
    )

    def __init__(
        self,
        conn: ClientConnection,
        ctx: RequestContext,
        keep_alive: bool,
        snapshot: Snapshot,
        upgrade: bytes | None,
        expect_continue: bool,
    ) -> None:
        self.conn = conn
        self.ctx = ctx
        self.keep_alive = keep_alive
        self.snapshot = snapshot
        self.upgrade = upgrade
        self.upgrade_tail = b""
        # The client's Connection header (what else it names is not forwarded).
        self.connection: bytes | None = None
        self.expect_continue = expect_continue
        self.chain: Chain = snapshot.global_chain
        # The access hook's Deferred while its future is pending.
        self.deferred: Deferred | None = None
        self.service: Service | None = None
        self.timeouts = DEFAULT_TIMEOUTS
        self.upstream_path = ctx.path
        self.upstream: UpstreamConnection | None = None
        self.pool: ConnectionPool | None = None
        self.body_buf: list[bytes] = []
        self.body_buf_size = 0
        self.body_received = 0
        self.request_done = False
        self.upstream_sent_all = False
        self.response_started = False
        self.finished = False
        self.close_after = not keep_alive
        self.resp_chunked = False
        self.resp_connection: bytes | None = None
        self.filters: FilterChain | None = None
        # Client-bound bytes produced while handling one upstream read: written in
        # one send by flush_output(), not one syscall per head and chunk.
        self.out: list[bytes] = []
        self.reused = False
        self.retried = False
        # An answer decided before routing (a refused request): sent when its turn comes.
        self.preset: Response | None = None
        # The upstream side: the cluster once admitted, the target of the current
        # attempt, the targets tried before it, the deadline of all attempts.
        self.cluster: Cluster | None = None
        self.host: Host | None = None
        self.attempt = 0
        self.tried: list[str] | None = None
        self.outcome_done = False
        self.deadline = 0.0
        self.retry_timer: asyncio.TimerHandle | None = None
        # The final outcome for the service breaker (None: nothing the upstream did).
        self.service_failed: bool | None = None
        # True once the service breaker has this request's outcome.
        self.settled = False
        # The request body received so far, kept for a retry while it is short.
        self.replay: list[bytes] | None = []
        self.replay_size = 0

    @property
    def body_pending(self) -> bool:
        """True while request body bytes are still to come from the client."""
        ctx = self.ctx
        return not self.request_done and (ctx.chunked or bool(ctx.content_length))

    # ---- start: routing and the access phase ------------------------------------

    def start(self) -> None:
        """Called by the client connection when this request's turn comes."""
        ctx = self.ctx
        if self.preset is not None:
            self.respond(self.preset)
            return
        if self.connection is not None:
            self._drop_named_headers()
        try:
            match = self.snapshot.router.match(ctx.method, ctx.host, ctx.path, ctx.headers)
            if match is not None:
                route = match.route
                ctx.route = route
                if match.path_params:
                    # The match may come from the router's cache: copy, never share.
                    ctx.path_params = dict(match.path_params)
                self.upstream_path = match.upstream_path
                self.service = route.service
                if route.timeouts is not None:
                    self.timeouts = route.timeouts
                if route.chain is not None:
                    self.chain = route.chain
            self._access_result(self.chain.run_access(ctx))
        # The request boundary: a bug answers 500 (and is logged), never hangs.
        except Exception as exc:  # noqa: BLE001 - _access_failed logs it
            self._access_failed(exc)

    def _drop_named_headers(self) -> None:
        # What the client's Connection names is for this hop only: dropped from the
        # client's headers before routing and plugins, not when the upstream head is
        # written, so that a client cannot strip a header a plugin sets.
        base = UPSTREAM_HOPS.base
        drop = UPSTREAM_HOPS.drop(self.connection)
        self.connection = None
        if drop is not base:
            named = drop - base
            self.ctx.headers[:] = [h for h in self.ctx.headers if h[0] not in named]

    def _access_result(self, result: AccessResult) -> None:
        if result is None:
            self._after_access()
        elif isinstance(result, Response):
            self.respond(result)
        elif isinstance(result, Deferred):
            self.deferred = result
            result.future.add_done_callback(self._deferred_done)
        else:
            self.conn.plane.spawn(self._await_access(result))

    def _deferred_done(self, future: asyncio.Future[Any]) -> None:
        deferred = self.deferred
        if deferred is None or deferred.future is not future:
            return
        self.deferred = None
        try:
            # Resolved even when the client has gone: the hook may give back what
            # it took (a rate limit's charge).
            result = deferred.resolve()
            if not self.finished:
                self._access_result(result)
        except Exception as exc:  # noqa: BLE001 - _access_failed logs it
            self._access_failed(exc)

    async def _await_access(self, pending: Awaitable[Response | None]) -> None:
        try:
            result = await pending
            if not self.finished:
                self._access_result(result)
        except Exception as exc:  # noqa: BLE001 - _access_failed logs it
            self._access_failed(exc)

    def _access_failed(self, exc: Exception) -> None:
        """An access phase that raised: its GatewayError's answer, else a 500."""
        request_id = self.ctx.request_id
        if isinstance(exc, GatewayError):
            self.respond(Response.from_error(exc, request_id))
            return
        log.error("request failed", request_id=request_id, exc_info=exc)
        self.respond(Response.error("internal_error", request_id))

    def _after_access(self) -> None:
        ctx = self.ctx
        service = self.service
        if service is None:
            self._respond_unrouted()
            return
        if (ctx.content_length is not None and ctx.content_length > ctx.max_body_size) or (
            self.body_received > ctx.max_body_size
        ):
            self.close_after = True
            self.respond(Response.error("payload_too_large", ctx.request_id))
            return
        cluster = service.cluster
        assert cluster is not None  # bound when the snapshot reached the data plane
        now = self.conn.plane.loop.time()
        if not cluster.breaker.closed_fast:
            refusal = cluster.admit(now)
            if refusal is not None:
                self.respond(refusal_response(refusal, ctx, service.name))
                return
        self.cluster = cluster
        cluster.budget.pending += 1  # folded into its window by the sweeper's tick
        if self.timeouts.total is not None:
            self.deadline = now + self.timeouts.total
        if self.expect_continue and not self.request_done and self.body_received == 0:
            self.conn.write(CONTINUE)
        self._attempt(now)

    def _attempt(self, now: float) -> None:
        """Send the request to a target the cluster picks (another one on a retry)."""
        cluster = self.cluster
        service = self.service
        assert cluster is not None and service is not None
        hash_on = cluster.config.hash_on
        picked = cluster.pick(now, hash_key(self.ctx, hash_on) if hash_on else None, self.tried)
        if isinstance(picked, Refusal):
            # With no target asked, the service's breaker is not told (else a cluster
            # with no target yet would turn no_healthy_upstream into circuit_open and
            # keep a new target out for open_time); after failed attempts, it is.
            self.service_failed = True if self.attempt else None
            self.respond(refusal_response(picked, self.ctx, service.name))
            return
        self.host = picked
        picked.active += 1
        self.attempt += 1
        self.outcome_done = False
        # Known from here on, so that an error before any byte is sent (connect
        # refused, connect timeout) still names the upstream it could not reach.
        self.ctx.upstream_addr = picked.key
        pool = self.pool = self.conn.plane.pools.get(picked.target, service.pool)
        upstream = pool.acquire_nowait()
        if upstream is not None:
            self.reused = True
            self._send(upstream)
        else:
            self.reused = False
            self.conn.plane.spawn(self._connect(pool))

    def _respond_unrouted(self) -> None:
        ctx = self.ctx
        allowed = self.snapshot.router.methods_for(ctx.host, ctx.path, ctx.headers)
        if allowed:
            allow = ", ".join(sorted(allowed)).encode()
            self.respond(
                Response.error(
                    "method_not_allowed",
                    ctx.request_id,
                    details={"allowed": sorted(allowed)},
                    headers=[(b"allow", allow)],
                )
            )
        else:
            self.respond(Response.error("route_not_found", ctx.request_id))

    # ---- the upstream request ----------------------------------------------------

    async def _connect(self, pool: ConnectionPool) -> None:
        timeout = self.timeouts.connect
        if self.deadline:
            timeout = min(timeout, max(self.deadline - self.conn.plane.loop.time(), 0.0))
        try:
            upstream = await pool.connect(timeout)
        except UpstreamError as exc:
            if self.finished:
                return
            self._attempt_failed(exc, sent=False)
            return
        if self.finished:
            pool.release(upstream, True)
            return
        self._send(upstream)

    def _send(self, upstream: UpstreamConnection) -> None:
        ctx = self.ctx
        self.upstream = upstream
        ctx.upstream_addr = self.pool.target.key if self.pool else None
        ctx.upstream_start = time.perf_counter()
        chain = active_chain(ctx, self.chain)
        # Nothing will read or edit the response head: take it as bytes (headers
        # plugins only add, ctx.response_headers, are appended to those bytes, and
        # raw-safe plugins' edits, ctx.raw_drop and raw_headers, are applied to them).
        raw = not (
            (chain.response_hooks and not chain.raw_safe) or chain.body_filter_hooks
            or self.upgrade is not None or ctx.method == "HEAD"
        )
        upstream.send_head(self, self._request_head(), ctx.method == "HEAD", raw)
        if self.conn.write_paused:
            # The client is still not reading an earlier response on this connection.
            upstream.pause_reading()
        if self.body_buf:
            chunks, self.body_buf, self.body_buf_size = self.body_buf, [], 0
            for chunk in chunks:
                self._write_body(upstream, chunk)
            self.conn.resume_reading(self.conn.PAUSE_BODY)
        if self.request_done:
            self._end_body(upstream)
        self._arm_read_timeout()

    def _request_head(self) -> bytes:
        ctx = self.ctx
        assert self.pool is not None
        route = ctx.route
        target = self.pool.target
        if route is not None and route.config.preserve_host:
            host = ctx.host_header or target.authority
        else:
            host = target.authority
        return request_head(
            ctx, self.upstream_path, host, self.upgrade,
            self.snapshot.trusted_proxies.contains(ctx.peer_ip), self.conn.local_port,
        )

    def _write_body(self, upstream: UpstreamConnection, chunk: bytes) -> None:
        if self.ctx.chunked:
            upstream.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        else:
            upstream.write(chunk)

    def _end_body(self, upstream: UpstreamConnection) -> None:
        if self.ctx.chunked:
            upstream.write(b"0\r\n\r\n")
        self.upstream_sent_all = True

    def _arm_read_timeout(self) -> None:
        if self.request_done and self.service is not None and not self.finished:
            conn = self.conn
            if conn.write_paused:
                conn.set_deadline("send", conn.settings.body_timeout)
            else:
                conn.set_deadline("upstream", self.read_timeout())

    def read_timeout(self) -> float:
        read = self.timeouts.read
        if self.deadline and not self.response_started:
            # Until the head arrives, the total timeout bounds the wait too.
            return min(read, max(self.deadline - self.conn.plane.loop.time(), 0.0))
        return read

    # ---- attempts: outcomes and retries --------------------------------------------

    def _outcome(self, status: int | None, error: Outcome | None = None) -> None:
        """Tell the cluster how this attempt ended (once per attempt)."""
        host = self.host
        cluster = self.cluster
        if host is None or cluster is None or self.outcome_done:
            return
        self.outcome_done = True
        cluster.attempt_done(host, self.conn.plane.loop.time(), status, error)
        if status is not None:
            cluster.stats.observe(
                cluster.name, host.key, time.perf_counter() - self.ctx.upstream_start
            )

    def _release_host(self) -> None:
        host, self.host = self.host, None
        if host is not None:
            host.active -= 1
            if not self.outcome_done and self.cluster is not None:
                self.cluster.attempt_abandoned(host, self.conn.plane.loop.time())
            self.outcome_done = True

    def _status_retried(self, status: int) -> bool:
        """The response head's status is known: record it; retry when it says so."""
        cluster = self.cluster
        host = self.host
        if cluster is None or host is None:
            return False
        if status < cluster.plain_below and not self.outcome_done:
            # The common case: a success for the target and for the service at once.
            self.outcome_done = True
            self.service_failed = False
            self.settled = True
            ctx = self.ctx
            cluster.succeeded(host, ctx.upstream_headers_at - ctx.upstream_start)
            if self.deadline and self.conn.deadline_kind == "upstream":
                self.conn.set_deadline("upstream", self.timeouts.read)
            return False
        self._outcome(status)
        self.service_failed = status in cluster.config.circuit_breaker.failure_statuses
        if status in cluster.config.retries.on_statuses and self._may_retry("status", True):
            self._abort_upstream()
            self._schedule_retry()
            return True
        if self.deadline and self.conn.deadline_kind == "upstream":
            # The head came within the total timeout: the body's pace is read's business.
            self.conn.set_deadline("upstream", self.timeouts.read)
        return False

    def _attempt_failed(self, exc: UpstreamError, sent: bool) -> None:
        """An attempt ended without a response head: retry it, or answer the error."""
        outcome = error_outcome(exc)
        if outcome is not None:
            self._outcome(None, outcome)
        self._release_host()
        if self._may_retry(retry_reason(exc), sent):
            self._schedule_retry()
        else:
            self._upstream_error(exc)

    def _may_retry(self, reason: str, sent: bool) -> bool:
        cluster = self.cluster
        if cluster is None or self.response_started or self.finished:
            return False
        if not may_retry(self.ctx, cluster, self.attempt, reason, sent, self.replay is not None):
            return False
        now = self.conn.plane.loop.time()
        if self.deadline and now >= self.deadline:
            return False
        # A request that timed out or was cut at a target may still be running
        # there: its retry goes to another target or not at all. (A refused connect
        # or a retryable status may try the same one again.)
        besides: list[str] = []
        if reason in ("timeout", "reset") and self.ctx.upstream_addr is not None:
            besides = [*(self.tried or ()), self.ctx.upstream_addr]
        if not cluster.has_available(now, besides):
            return False  # the last answer beats a refusal from an empty cluster
        if not cluster.budget.try_spend(now):
            cluster.stats.exhausted(cluster.name)
            return False
        cluster.stats.retry(cluster.name, reason)
        return True

    def _schedule_retry(self) -> None:
        cluster = self.cluster
        assert cluster is not None
        policy = cluster.config.retries
        loop = self.conn.plane.loop
        delay = backoff_delay(self.attempt, policy.backoff_base, policy.backoff_max, _RNG)
        if self.deadline:
            delay = min(delay, max(self.deadline - loop.time(), 0.0))
        if self.ctx.upstream_addr is not None:
            self.tried = [*(self.tried or ()), self.ctx.upstream_addr]
        # Everything received so far goes again, in order; what is still to come
        # follows it as it arrives. (Without a kept copy nothing was sent yet: the
        # buffer still holds it all.)
        if self.replay is not None:
            self.body_buf = list(self.replay)
            self.body_buf_size = self.replay_size
        self.upstream_sent_all = False
        self.retry_timer = loop.call_later(delay, self._retry_now)

    def _retry_now(self) -> None:
        self.retry_timer = None
        if not self.finished:
            self._attempt(self.conn.plane.loop.time())

    # ---- request body from the client ----------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        ctx = self.ctx
        size = len(chunk)
        self.body_received += size
        ctx.bytes_in += size
        if self.finished:
            return  # answered already: the rest is read and dropped
        if self.body_received > ctx.max_body_size:
            self._abort_upstream()
            if self.response_started:
                self._fail_client("request_too_large")
            else:
                self.close_after = True
                self.respond(Response.error("payload_too_large", ctx.request_id))
            return
        replay = self.replay
        if replay is not None:
            if self.replay_size + size <= REPLAY_LIMIT:
                replay.append(chunk)
                self.replay_size += size
            else:
                self.replay = None  # too long to keep: no retry once bytes went out
        upstream = self.upstream
        if upstream is not None:
            self._write_body(upstream, chunk)
        else:
            self.body_buf.append(chunk)
            self.body_buf_size += size
            if self.body_buf_size > BODY_BUFFER:
                self.conn.pause_reading(self.conn.PAUSE_BODY)

    def request_complete(self) -> None:
        self.request_done = True
        if self.finished:
            return
        upstream = self.upstream
        if upstream is not None:
            self._end_body(upstream)
            self._arm_read_timeout()

    def request_invalid(self, message: str) -> None:
        """The client's body broke the framing rules mid-stream (bad chunk, ...)."""
        self.close_after = True
        if self.finished:
            return
        self._abort_upstream()
        if self.response_started:
            self._fail_client("bad_request_body")
        else:
            self.respond(Response.error("bad_request", self.ctx.request_id, message))

    # ---- response from the upstream ------------------------------------------------

    def upstream_head(
        self, status: int, reason: bytes, headers: Headers, content_length: int | None,
        chunked: bool, connection: bytes | None,
    ) -> None:
        ctx = self.ctx
        self.resp_connection = connection
        ctx.upstream_headers_at = time.perf_counter()
        if self._status_retried(status):
            return
        if status == 101:
            if self.upgrade is None:
                self._upstream_error_now("upstream_bad_response", "unexpected 101 response")
                return
            self._start_relay(reason, headers)
            return
        if self.upgrade is not None:
            # The upstream refused the upgrade: answer, then close (the client parser
            # stopped at the upgrade request).
            self.close_after = True
        self._write_head(ResponseHead(status, headers, reason), content_length)

    def upstream_body(self, data: bytes) -> None:
        # The read deadline tracks the upstream's progress, whatever a body filter
        # (gzip) holds back from the client for now.
        self.conn.refresh_deadline()
        if self.filters is not None:
            try:
                data = self.filters.feed(data)
            except Exception:  # a plugin bug: cut this response, keep the gateway
                log.exception("body filter failed", request_id=self.ctx.request_id)
                self._fail_client("body_filter_failed")
                return
            if not data:
                return
        self._write_client_body(data)

    def upstream_complete(self, keep_alive: bool) -> None:
        upstream, self.upstream = self.upstream, None
        if self.finished:
            if upstream is not None:
                upstream.close()
            return
        if self.filters is not None:
            try:
                self._flush_filters()
            except Exception:
                log.exception("body filter failed", request_id=self.ctx.request_id)
                if upstream is not None:
                    upstream.close()
                self._fail_client("body_filter_failed")
                return
        if self.resp_chunked:
            self.out.append(b"0\r\n\r\n")
        self.flush_output()
        if upstream is not None and self.pool is not None:
            self.pool.release(
                upstream, keep_alive and self.upstream_sent_all and self.upgrade is None
            )
        self._release_host()
        self._finish()

    def upstream_failed(self, exc: UpstreamError) -> None:
        self.upstream = None
        if self.finished:
            return
        if not self.response_started:
            if self._can_retry_stale(exc):
                # The pooled connection had died while idle: not the target's fault,
                # not a retry of the request; the same target gets a fresh connection.
                self.retried = True
                self.reused = False
                assert self.pool is not None
                self.conn.plane.spawn(self._connect(self.pool))
                return
            self._attempt_failed(exc, sent=True)
        else:
            self._fail_client("upstream_closed")

    def upstream_writable(self, writable: bool) -> None:
        conn = self.conn
        if writable:
            conn.resume_reading(conn.PAUSE_UPSTREAM)
            if conn.deadline_kind == "upstream_write":
                if conn.relay is self:
                    conn.set_deadline("relay", conn.settings.websocket_idle_timeout)
                elif self.request_done:
                    conn.set_deadline("upstream", self.read_timeout())
                else:
                    conn.set_deadline("body", conn.settings.body_timeout)
        else:
            # The upstream stopped taking the request body: its stall, not the
            # client's, so the write timeout runs instead of the client body timeout.
            conn.pause_reading(conn.PAUSE_UPSTREAM)
            conn.set_deadline("upstream_write", self.timeouts.write)

    def client_writable(self, writable: bool) -> None:
        upstream = self.upstream
        if upstream is None:
            return
        if writable:
            upstream.resume_reading()
        else:
            upstream.pause_reading()

    def _can_retry_stale(self, exc: UpstreamError) -> bool:
        # A pooled connection the upstream closed while idle fails before any byte of
        # response: retry once on a fresh one when replaying cannot do harm.
        if not self.reused or self.retried or exc.code != "upstream_unavailable":
            return False
        ctx = self.ctx
        has_body = ctx.chunked or bool(ctx.content_length)
        has_key = header_get(ctx.headers, b"idempotency-key") is not None
        return not has_body and may_retry_method(ctx.method, has_key, non_idempotent=False)

    # ---- writing to the client -----------------------------------------------------

    def _write_head(
        self, head: ResponseHead, content_length: int | None, body: bytes | None = None
    ) -> None:
        ctx = self.ctx
        ctx.status = head.status
        if ctx.response_headers:
            head.headers.extend(ctx.response_headers)
        chain = active_chain(ctx, self.chain)
        filters = None
        if chain.response_hooks or chain.body_filter_hooks:
            filters = chain.run_response_headers(ctx, head)
        no_body = ctx.method == "HEAD" or head.status in NO_BODY_STATUS or head.status < 200
        drop = DOWNSTREAM_HOPS.drop(self.resp_connection)
        headers = [h for h in head.headers if h[0] not in drop]
        if filters is not None and not no_body:
            self.filters = filters
            content_length = None
            if body is not None:
                body = filters.feed(body) + filters.finish()
                content_length = len(body)
                self.filters = None
        self.response_started = True
        framing = self._framing(head.status, content_length)
        self.out.append(render_head(head.status, head.reason, headers, framing))
        if body and not no_body:
            self.out.append(body)
            ctx.bytes_out += len(body)

    def upstream_raw_head(
        self, status: int, block: bytes, content_length: int | None, chunked: bool
    ) -> None:
        """The upstream's head as bytes (status line and headers, hop-by-hop cut).

        Used when nothing on this route reads or edits response headers: the head
        goes out as the upstream wrote it, with our status-line version and framing.
        """
        ctx = self.ctx
        ctx.upstream_headers_at = time.perf_counter()
        if self._status_retried(status):
            return
        ctx.status = status
        self.response_started = True
        if ctx.raw_drop is not None:
            block = drop_header_lines(block, ctx.raw_drop)
        extra = b""
        raw_headers = ctx.raw_headers
        if ctx.response_headers or raw_headers is not None:
            # A flat list and one join: a generator costs a frame object in compiled
            # code too (rate-limit adds five headers to every response).
            parts: list[bytes] = []
            for name, value in ctx.response_headers:
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")
            if raw_headers is not None:
                for name, value in raw_headers:
                    parts.append(name)
                    parts.append(b": ")
                    parts.append(value)
                    parts.append(b"\r\n")
            extra = b"".join(parts)
        self.out.append(raw_response_head(block, self._framing(status, content_length), extra))

    def _framing(self, status: int, content_length: int | None) -> bytes:
        ctx = self.ctx
        conn = self.conn
        lines, self.resp_chunked, self.close_after = response_framing(
            ctx.method, ctx.http_version, status, content_length,
            self.close_after or conn.plane.draining or conn.reading_stopped,
        )
        return lines

    def _write_client_body(self, data: bytes) -> None:
        self.ctx.bytes_out += len(data)
        if self.resp_chunked:
            self.out.append(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            self.out.append(data)

    def flush_output(self) -> None:
        out = self.out
        if out:
            self.conn.write(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def _flush_filters(self) -> None:
        assert self.filters is not None
        tail = self.filters.finish()
        self.filters = None
        if tail:
            self._write_client_body(tail)

    def respond(self, response: Response) -> None:
        """Answer with a gateway-made response (errors, preflights, plugin answers)."""
        if self.finished:
            return
        if self.response_started:
            self._fail_client("error_after_response_started")
            return
        self._abort_upstream()
        if response.code:
            self.conn.plane.metrics.error(response.code)
        headers = list(response.headers)
        headers.append((b"date", DATE.get()))
        if self.body_pending:
            # The rest of the body will not be read as a request of its own.
            self.close_after = True
        head = ResponseHead(response.status, headers, b"", from_gateway=True)
        self._write_head(head, len(response.body), response.body)
        self.flush_output()
        self._finish()

    def _upstream_error(self, exc: UpstreamError) -> None:
        ctx = self.ctx
        self.service_failed = True
        log.warning(
            "upstream failed", request_id=ctx.request_id, upstream=ctx.upstream_addr,
            error=str(exc), code=exc.code,
        )
        if self.response_started:
            self._fail_client(exc.code)
        else:
            self.respond(
                Response.error(exc.code, ctx.request_id, details={"upstream": ctx.upstream_addr})
            )

    def _upstream_error_now(self, code: str, message: str) -> None:
        self._abort_upstream()
        self._upstream_error(_coded(code, message))

    # ---- timeouts and aborts -------------------------------------------------------

    def on_timeout(self, kind: str) -> None:
        if self.finished:
            return
        if kind == "upstream":
            if self.upstream is None and self.retry_timer is not None:
                return  # between attempts: the next one arms its own deadline
            self._abort_upstream(keep_host=True)
            exc = UpstreamReadTimeout("upstream read timed out")
            if self.response_started:
                self._release_host()
                self._upstream_error(exc)
            else:
                self._attempt_failed(exc, sent=True)
        elif kind == "upstream_write":
            self._outcome(None, Outcome.TIMEOUT)
            self._abort_upstream()
            self.close_after = True  # the rest of the request body is not read
            self._upstream_error(UpstreamWriteTimeout("upstream stopped reading the request"))
        elif kind == "body":
            self._abort_upstream()
            self.close_after = True
            if self.response_started:
                self._fail_client("client_body_timeout")
            else:
                self.respond(Response.error("request_timeout", self.ctx.request_id))
        else:
            self._fail_client(f"{kind}_timeout")

    def client_gone(self, reason: str = "client_closed") -> None:
        if self.finished:
            return
        self._abort_upstream()
        self.ctx.aborted = reason
        if not self.ctx.status:
            self.ctx.status = 499  # nginx's code for "client closed request", logs only
        self._finish(notify_client=False)

    def _abort_upstream(self, keep_host: bool = False) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        if not keep_host:
            self._release_host()

    def _fail_client(self, reason: str) -> None:
        """Something broke after the response began: all we can do is cut it."""
        self._abort_upstream()
        self.out.clear()
        self.ctx.aborted = reason
        self.close_after = True
        self.conn.abort()
        self._finish(notify_client=False)

    # ---- websocket and other upgrades ----------------------------------------------

    def _start_relay(self, reason: bytes, headers: Headers) -> None:
        ctx = self.ctx
        ctx.status = 101
        head = ResponseHead(101, headers, reason)
        if ctx.response_headers:
            head.headers.extend(ctx.response_headers)
        active_chain(ctx, self.chain).run_response_headers(ctx, head)
        out = [h for h in head.headers if h[0] not in HOP_BY_HOP]
        assert self.upgrade is not None
        out += [(b"connection", b"upgrade"), (b"upgrade", self.upgrade)]
        self.response_started = True
        self.conn.write(render_head(101, reason, out))
        upstream = self.upstream
        assert upstream is not None
        upstream.start_relay()
        self.conn.start_relay(self)
        if self.upgrade_tail:
            upstream.write(self.upgrade_tail)
            self.upgrade_tail = b""

    def upstream_upgraded(self, tail: bytes) -> None:
        if tail:
            self.relay_from_upstream(tail)

    def relay_from_upstream(self, data: bytes) -> None:
        self.ctx.bytes_out += len(data)
        self.conn.write(data)
        self.conn.refresh_deadline()

    def relay_from_client(self, data: bytes) -> None:
        upstream = self.upstream
        self.ctx.bytes_in += len(data)
        if upstream is not None:
            upstream.write(data)
        self.conn.refresh_deadline()

    def relay_closed(self) -> None:
        """The upstream side of a relay closed: close the client side after flushing."""
        self.upstream = None
        self._release_host()
        self.close_after = True
        self._finish()

    def client_relay_closed(self) -> None:
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.close()
        self._release_host()
        self._finish(notify_client=False)

    # ---- the end -------------------------------------------------------------------

    def _finish(self, notify_client: bool = True) -> None:
        if self.finished:
            return
        self.finished = True
        ctx = self.ctx
        ctx.finished_at = time.perf_counter()
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        cluster = self.cluster
        if cluster is not None:
            if self.host is not None:
                self._release_host()
            if not self.settled:
                cluster.request_done(self.conn.plane.loop.time(), self.service_failed)
        if notify_client:
            self.conn.exchange_done(self)
        else:
            self.conn.exchange_dropped(self)
        plane = self.conn.plane
        chain = active_chain(ctx, self.chain)
        if chain.log_hooks:
            chain.run_log(ctx)
        route = ctx.route
        plane.metrics.request(
            route.name if route is not None else "",
            self.service.name if self.service is not None else "",
            ctx.status,
            ctx.finished_at - ctx.start,
            ctx.upstream_headers_at - ctx.upstream_start if ctx.upstream_headers_at else None,
        )


_RNG = random.Random()


def _coded(code: str, message: str) -> UpstreamError:
    exc = UpstreamError(message)
    exc.code = code
    return exc

