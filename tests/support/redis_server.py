"""Redis for tests: the shared server's client, and private servers to kill.

The shared Redis at 127.0.0.1:6379 is never stopped or flushed by a test: tests
write under a prefix of their own and drop it (`drop_keys`). A test that needs
Redis to die starts a `PrivateRedis` and ends it by its own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from support.gateway import free_port

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


async def shared_client() -> Redis:
    """A client of the shared Redis (the test is skipped without it; in CI the
    needs_redis marker turns that skip into a failure)."""
    client: Redis = Redis.from_url(SHARED_REDIS_URL)
    try:
        async with asyncio.timeout(2):
            await client.ping()
    except Exception as exc:  # whatever redis-py raises, the service is not there
        await client.aclose()
        pytest.skip(f"Redis not reachable at 127.0.0.1:6379: {exc}")
    return client


async def drop_keys(client: Redis, prefix: str) -> None:
    """Delete every key under a test's own prefix."""
    keys = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
    if keys:
        await client.delete(*keys)


class PrivateRedis:
    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        # A directory made here is removed again by kill().
        self._own_dir = workdir is None
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="tollway-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> PrivateRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)  # polling for the port to open; nothing to wait on
        self.kill()
        raise RuntimeError("redis-server did not start in time")

    def kill(self) -> None:
        """SIGKILL: Redis dies as in a crash, without closing connections politely."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        if self._own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def private_redis(workdir: Path | None = None) -> Iterator[PrivateRedis]:
    server = PrivateRedis(workdir).start()
    try:
        yield server
    finally:
        server.kill()
