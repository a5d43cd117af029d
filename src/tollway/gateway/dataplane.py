"""One worker's data plane: the listening socket, its connections, the current
snapshot, the upstream pools, and the sweeper that enforces timeouts.

One sweeper tick checks every connection's deadline, instead of a timer per
request: a keep-alive request then costs a float store, not a timer handle.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Coroutine
from typing import Any, Protocol

import structlog

from tollway.config.snapshot import Snapshot
from tollway.gateway.server import ClientConnection
from tollway.settings import Settings
from tollway.upstream.clusters import ClusterManager
from tollway.upstream.pool import PoolManager

log = structlog.get_logger("tollway.dataplane")

SWEEP_INTERVAL = 0.1
# With no client connection there is no deadline to watch: the sweeper then only
# ages the upstream pools and the counters, and one wake-up a second is enough
# (an idle gateway should not wake ten times a second). The first connection
# brings the fast sweep back.
IDLE_SWEEP_INTERVAL = 1.0
POOL_SWEEP_INTERVAL = 1.0


class RequestMetrics(Protocol):
    def request(
        self, route: str, service: str, status: int, seconds: float,
        upstream_seconds: float | None,
    ) -> None: ...

    def error(self, code: str) -> None: ...

    def connection_opened(self) -> None: ...

    def connection_closed(self) -> None: ...


class NullMetrics:
    def request(
        self, route: str, service: str, status: int, seconds: float,
        upstream_seconds: float | None,
    ) -> None:
        return None

    def error(self, code: str) -> None:
        return None

    def connection_opened(self) -> None:
        return None

    def connection_closed(self) -> None:
        return None


class DataPlane:
    def __init__(
        self,
        settings: Settings,
        snapshot: Snapshot,
        metrics: RequestMetrics | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.settings = settings
        self.snapshot = snapshot
        self.metrics: RequestMetrics = metrics or NullMetrics()
        self.loop = loop or asyncio.get_running_loop()
        self.pools = PoolManager()
        # Balancing, health, breakers: per service, kept across snapshots like the pools.
        self.clusters = ClusterManager()
        self.clusters.apply(snapshot.services)
        self.connections: set[ClientConnection] = set()
        self.draining = False
        # Why connections are being cut, for the access log of their requests.
        self.abort_reason: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._sweeper: asyncio.TimerHandle | None = None
        # True while the pending sweep is an idle one (IDLE_SWEEP_INTERVAL away).
        self._idle = False
        self._next_pool_sweep = 0.0
        self.sweeps = 0
        self._retired: list[Snapshot] = []
        self._all_closed = asyncio.Event()

    # ---- listening -----------------------------------------------------------------

    async def listen(self, host: str, port: int, reuse_port: bool = False) -> int:
        """Start accepting; returns the bound port (useful with port 0)."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        return await self.serve_socket(sock)

    async def serve_socket(self, sock: socket.socket) -> int:
        server = await self.loop.create_server(
            lambda: ClientConnection(self), sock=sock, backlog=2048
        )
        self._servers.append(server)
        self._schedule_sweep()
        bound: int = sock.getsockname()[1]
        return bound

    # ---- connections ---------------------------------------------------------------

    def connection_opened(self, conn: ClientConnection) -> None:
        self.connections.add(conn)
        self.metrics.connection_opened()
        if self._idle:
            self._wake_sweeper()

    def connection_closed(self, conn: ClientConnection) -> None:
        self.connections.discard(conn)
        self.metrics.connection_closed()
        if self.draining and not self.connections:
            self._all_closed.set()

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a request's waiting part as a task that cannot be garbage-collected."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- config --------------------------------------------------------------------

    def swap(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current. Requests already running keep theirs; a retired
        snapshot's plugins are closed once no request uses it (see _sweep)."""
        self.clusters.apply(snapshot.services)
        old, self.snapshot = self.snapshot, snapshot
        self._retired.append(old)

    def _close_unused_retired(self) -> None:
        # Checked a few times a second, only while a retired snapshot exists, so
        # requests pay no reference counting for a rare event.
        in_use = {
            id(ex.snapshot)
            for conn in self.connections
            for ex in (*conn.queue, *((conn.relay,) if conn.relay is not None else ()))
        }
        for snapshot in [s for s in self._retired if id(s) not in in_use]:
            self._retired.remove(snapshot)
            snapshot.close()

    # ---- timeouts ------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        expired = [c for c in self.connections if 0 < c.deadline <= now]
        for conn in expired:
            try:
                conn.on_deadline()
            except Exception:  # one bad connection must not stop the sweeper
                log.exception("deadline handling failed")
                conn.abort()
        self.sweeps += 1
        self.clusters.tick(now)
        if now >= self._next_pool_sweep:
            self._next_pool_sweep = now + POOL_SWEEP_INTERVAL
            self.pools.sweep(now)
            if self._retired:
                self._close_unused_retired()
        # Connections that came and went since the last sweep woke it (see
        # connection_opened), so their requests' counts are folded by this one.
        self._idle = not self.connections
        interval = IDLE_SWEEP_INTERVAL if self._idle else SWEEP_INTERVAL
        self._sweeper = self.loop.call_later(interval, self._sweep)

    @property
    def sweeper_idle(self) -> bool:
        """Whether the next sweep is the slow, idle one."""
        return self._idle

    def _wake_sweeper(self) -> None:
        self._idle = False
        if self._sweeper is not None:  # None: shut down
            self._sweeper.cancel()
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # ---- shutdown ------------------------------------------------------------------

    async def shutdown(self, grace: float) -> int:
        """Stop accepting, let in-flight requests finish up to `grace` s, then close.

        Returns how many connections had to be cut.
        """
        self.draining = True
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace)
        cut = len(self.connections)
        self.abort_reason = "shutdown_deadline"
        for conn in list(self.connections):
            conn.abort()
        if cut:
            # Let the aborted connections end their requests (log phase included)
            # before the plugins that log them are closed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 1.0)
        for server in self._servers:
            await server.wait_closed()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self.pools.close()
        await self.clusters.aclose()
        for task in list(self._tasks):
            task.cancel()
        self.snapshot.close()
        for old in self._retired:
            old.close()
        return cut
