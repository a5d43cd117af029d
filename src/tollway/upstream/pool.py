"""Keep-alive connection pools, one per upstream target, kept across config reloads.

Idle connections are a stack (the most recently used first: it is the least likely
to have been closed by the upstream's own idle timeout). A connection goes back to
the pool only when its owner says it is clean: complete response, fully sent
request, keep-alive on both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from tollway.config.schema import PoolConfig
from tollway.upstream.connection import UpstreamConnection
from tollway.upstream.errors import PoolExhausted, UpstreamConnectError, UpstreamConnectTimeout
from tollway.upstream.service import Target


class ConnectionPool:
    def __init__(self, target: Target, config: PoolConfig) -> None:
        self.target = target
        self.config = config
        self.idle: list[UpstreamConnection] = []
        self.open = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # Remembered: asyncio.get_running_loop() costs a getpid() system call on
        # Python 3.11, and release() runs once per proxied request.
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def in_use(self) -> int:
        return self.open - len(self.idle)

    def acquire_nowait(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            transport = conn.transport
            if not conn.closed and transport is not None and not transport.is_closing():
                return conn
        return None

    async def connect(self, connect_timeout: float) -> UpstreamConnection:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + connect_timeout
        limit = self.config.max_per_host
        while limit and self.open >= limit:
            conn = self.acquire_nowait()
            if conn is not None:
                return conn
            waiter: asyncio.Future[None] = loop.create_future()
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, max(deadline - loop.time(), 0))
            except TimeoutError as exc:
                raise PoolExhausted(
                    f"{self.target.key}: {limit} connections busy for {connect_timeout:.1f}s"
                ) from exc
            finally:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
        conn = self.acquire_nowait()
        if conn is not None:
            return conn
        self.open += 1
        target = self.target
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0)):
                if target.unix_path:
                    _, conn = await loop.create_unix_connection(
                        lambda: UpstreamConnection(self), target.unix_path
                    )
                else:
                    _, conn = await loop.create_connection(
                        lambda: UpstreamConnection(self), target.host, target.port
                    )
        except TimeoutError as exc:
            self.open -= 1
            self._wake()
            raise UpstreamConnectTimeout(f"connect to {target.key} timed out") from exc
        except OSError as exc:
            self.open -= 1
            self._wake()
            raise UpstreamConnectError(f"connect to {target.key}: {exc.strerror or exc}") from exc
        except asyncio.CancelledError:
            self.open -= 1  # or the slot would stay taken for good
            self._wake()
            raise
        return conn

    def release(self, conn: UpstreamConnection, reusable: bool) -> None:
        conn.owner = None
        if reusable and not conn.closed and len(self.idle) < self.config.max_idle:
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            conn.idle_since = loop.time()
            self.idle.append(conn)
            self._wake()
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        """Called once by a connection when it is lost."""
        self.open -= 1
        if conn in self.idle:
            self.idle.remove(conn)
        self._wake()

    def sweep(self, now: float) -> None:
        limit = now - self.config.idle_timeout
        if self.idle and self.idle[0].idle_since < limit:
            stale = [c for c in self.idle if c.idle_since < limit]
            self.idle = [c for c in self.idle if c.idle_since >= limit]
            for conn in stale:
                conn.close()

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle = []

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class PoolManager:
    """All pools of one worker, by target. Survives config snapshots."""

    def __init__(self) -> None:
        self.pools: dict[str, ConnectionPool] = {}

    def get(self, target: Target, config: PoolConfig) -> ConnectionPool:
        pool = self.pools.get(target.key)
        if pool is None:
            pool = self.pools[target.key] = ConnectionPool(target, config)
        elif pool.config is not config:
            # The latest snapshot's settings win; existing connections stay.
            pool.config = config
        return pool

    def sweep(self, now: float) -> None:
        for pool in self.pools.values():
            pool.sweep(now)

    def stats(self) -> dict[str, tuple[int, int]]:
        return {key: (len(p.idle), p.in_use) for key, p in self.pools.items()}

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
