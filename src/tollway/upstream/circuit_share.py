"""Open circuits shared through Redis: one node learning a target is down spares
the others the failures it took to learn it.

An open is a key `{prefix}circuit:{name}` holding the node id, with a PX TTL of
the open time (Redis expires it when the circuit would turn half-open), and a
message `{"name", "seconds", "node"}` on `{prefix}circuits`. Only durations travel:
each node adds them to its own monotonic clock, so wall-clock skew between nodes
does not matter.

A node applies other nodes' opens through `on_remote_open(name, seconds)` (which
calls the breaker's force_open); its own messages and keys are ignored. A node that
subscribes (at start, or again after an outage) first loads the keys still alive,
so it learns opens published while it was away. The same open may therefore reach
the callback twice (key and message): force_open is idempotent, and so must any
other callback be.

Redis is an optimisation here: every breaker works locally without it. So nothing
in this module raises into its caller; publishing is fire and forget, and the
subscription reconnects with backoff, logging once per outage. The subscriber
loop's liveness check (PING, silence = dead) is storage/redis_pubsub.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from tollway.storage.redis_pubsub import listen
from tollway.upstream.circuit import BreakerState, CircuitBreaker, Transition

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = structlog.get_logger("tollway.circuits")

CONNECT_TIMEOUT = 5.0
# start() waits this long at most for the first subscription and load: with Redis
# up they take milliseconds, with Redis down (redis-py retries a refused connect
# for seconds) the gateway must not wait to serve.
START_WAIT = 1.0
# A publish that takes longer is dropped: the open is stale by then anyway.
PUBLISH_TIMEOUT = 1.0
# Reconnect backoff bounds, seconds.
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 10.0


def _text(value: bytes | str) -> str:
    # The client may or may not decode responses.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class CircuitShare:
    """See the module docstring."""

    def __init__(
        self,
        redis: Redis,
        node_id: str,
        on_remote_open: Callable[[str, float], None],
        prefix: str = "tollway:",
    ) -> None:
        # Here rather than at the top: redis-py costs a gateway without Redis about
        # 16 MB of RSS, and only a shared circuit needs its exceptions.
        from redis.exceptions import RedisError

        self._redis_down: tuple[type[BaseException], ...] = (
            RedisError, OSError, TimeoutError, ConnectionError,
        )
        self.redis = redis
        self.node_id = node_id
        self.on_remote_open = on_remote_open
        self.prefix = prefix
        self.channel = f"{prefix}circuits"
        self._key_prefix = f"{prefix}circuit:"
        self.subscribed = False
        # Counters for the metrics and tests.
        self.published = 0
        self.publish_failures = 0
        self.received = 0
        self._task: asyncio.Task[None] | None = None
        self._publishing: set[asyncio.Task[None]] = set()
        self._first_attempt = asyncio.Event()
        self._outage_logged = False
        self._closing = False

    def key(self, name: str) -> str:
        return f"{self._key_prefix}{name}"

    # ---- lifecycle ----------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe and load the opens already in Redis, then keep the subscription
        alive in the background. Returns after the first attempt, or START_WAIT,
        whether Redis answered or not; never raises."""
        if self._task is not None:
            return
        self._task = asyncio.create_task(self._subscribe_loop(), name="tollway-circuits-sub")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT):
                await self._first_attempt.wait()

    async def aclose(self) -> None:
        """Stop the subscription; give publishes under way their short timeout."""
        if self._closing:
            return
        self._closing = True
        if self._publishing:
            # Their own timeout ends them; the grace lets that ending be logged.
            await asyncio.wait(self._publishing, timeout=PUBLISH_TIMEOUT + 0.5)
        tasks = [*self._publishing, *([self._task] if self._task is not None else [])]
        self._task = None
        # Cancelled until they end: redis-py's get_message can swallow a
        # cancellation that lands together with its own read timeout (see bans.py).
        while any(not t.done() for t in tasks):
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks, timeout=0.1)
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, *self._redis_down):
                await task

    # ---- publishing -----------------------------------------------------------------

    def publish_open(self, name: str, seconds: float) -> None:
        """Tell the other nodes `name` is open for `seconds`; returns at once.

        Needs a running event loop (breakers transition inside request handling);
        without one, or after aclose(), the open stays local.
        """
        if self._closing or seconds <= 0:
            return
        try:
            task = asyncio.get_running_loop().create_task(
                self._publish(name, seconds), name="tollway-circuits-pub"
            )
        except RuntimeError:
            log.warning("circuit open not shared: no event loop", breaker=name)
            return
        # The loop keeps only weak references to tasks.
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)

    async def _publish(self, name: str, seconds: float) -> None:
        message = json.dumps({"name": name, "seconds": seconds, "node": self.node_id})
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.set(self.key(name), self.node_id, px=max(1, math.ceil(seconds * 1000)))
                    pipe.publish(self.channel, message)
                    await pipe.execute()
        except self._redis_down as exc:
            self.publish_failures += 1
            log.warning(
                "circuit open not shared", breaker=name, error=f"{type(exc).__name__}: {exc}"
            )
            return
        self.published += 1

    # ---- receiving --------------------------------------------------------------------

    def on_message(self, data: bytes | str) -> None:
        """Apply one `{prefix}circuits` message; junk and own messages are ignored."""
        try:
            message = json.loads(data)
            name, seconds, node = message["name"], message["seconds"], message["node"]
        except (ValueError, TypeError, KeyError):
            return
        if (
            not isinstance(name, str)
            or not isinstance(seconds, int | float)
            or isinstance(seconds, bool)
            or not math.isfinite(seconds)
            or seconds <= 0
            or node == self.node_id
        ):
            return
        self._apply(name, float(seconds))

    def _apply(self, name: str, seconds: float) -> None:
        self.received += 1
        # Boundary: the callback is the integrator's code; one bug there must not
        # end the subscription for every breaker.
        try:
            self.on_remote_open(name, seconds)
        except Exception:
            log.exception("on_remote_open failed", breaker=name)

    async def load(self) -> int:
        """Apply every other node's open still in Redis, with its remaining TTL;
        the number applied. Raises Redis errors (the loop handles them)."""
        pattern = _glob_escape(self._key_prefix) + "*"
        keys = [k async for k in self.redis.scan_iter(match=pattern, count=500)]
        if not keys:
            return 0
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.get(key)
                pipe.pttl(key)
            replies = await pipe.execute()
        applied = 0
        for i, key in enumerate(keys):
            node, pttl = replies[2 * i], replies[2 * i + 1]
            # Gone (None, -2) or without TTL (-1: not ours to trust) since SCAN.
            if node is None or not isinstance(pttl, int) or pttl <= 0:
                continue
            if _text(node) == self.node_id:
                continue
            self._apply(_text(key)[len(self._key_prefix) :], pttl / 1000)
            applied += 1
        return applied

    async def _subscribe_loop(self) -> None:
        backoff = BACKOFF_FIRST
        while not self._closing:
            pubsub = self.redis.pubsub()
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    await pubsub.subscribe(self.channel)
                    while (await pubsub.get_message(timeout=CONNECT_TIMEOUT)) is None:
                        pass
                    # Subscribed first, loaded second: an open published in between
                    # is both loaded and queued, never lost.
                    await self.load()
                self.subscribed = True
                self._first_attempt.set()
                backoff = BACKOFF_FIRST
                if self._outage_logged:
                    log.info("circuit sharing restored")
                    self._outage_logged = False
                await self._listen(pubsub)
            except asyncio.CancelledError:
                raise
            except self._redis_down as exc:
                if not self._outage_logged:
                    self._outage_logged = True
                    log.warning(
                        "circuit sharing unavailable; retrying",
                        error=f"{type(exc).__name__}: {exc}",
                    )
            finally:
                self.subscribed = False
                # Closing a broken connection raises whatever the socket says.
                with contextlib.suppress(*self._redis_down):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            self._first_attempt.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _listen(self, pubsub: Any) -> None:
        await listen(pubsub, self.on_message, lambda: not self._closing)


def share_opens(share: CircuitShare, then: Transition | None = None) -> Transition:
    """An on_transition hook that publishes this node's opens (never the ones
    force_open applied from peers), then calls `then` (metrics, logs) if given."""

    def on_transition(
        breaker: CircuitBreaker, old: BreakerState, new: BreakerState, now: float
    ) -> None:
        if new is BreakerState.OPEN and not breaker.last_transition_remote:
            # A local open lasts open_time; asking the breaker (retry_after) from
            # inside its own hook could start a nested transition when it is 0.
            share.publish_open(breaker.name, breaker.config.open_time)
        if then is not None:
            then(breaker, old, new, now)

    return on_transition
