"""Start Tollway for a test: in-process on free ports, or as a real subprocess."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from tollway.gateway.app import Gateway
from tollway.settings import Settings


def api_config(
    upstream_url: str, plugins: str = "", routes: str = "", top: str = "", service: str = ""
) -> str:
    """The usual test config: one service, one route on /api, optional plugins YAML.

    `routes` adds route entries after /api; `top` adds top-level YAML before services;
    `service` adds settings to the service (e.g. "retries: {attempts: 1}").
    """
    return f"""
{top}
services:
  - name: up
    url: {upstream_url}
    {service}
routes:
  - name: api
    service: up
    paths: [/api]
{routes}
{plugins}"""


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """n distinct free ports (held together while chosen, so never the same twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


@contextlib.asynccontextmanager
async def running_gateway(
    tmp_path: Path, config_yaml: str, **settings: Any
) -> AsyncIterator[Gateway]:
    """An in-process gateway (same event loop as the test) on free loopback ports."""
    config = tmp_path / "tollway.yaml"
    config.write_text(config_yaml)
    values: dict[str, Any] = {
        "config": config,
        "host": "127.0.0.1",
        "port": 0,
        "admin_host": "127.0.0.1",
        "admin_port": 0,
        "data_dir": tmp_path / "data",
        "reload_poll_interval": 0.05,
        "shutdown_timeout": 5.0,
    }
    values.update(settings)
    gateway = Gateway(Settings(**values))
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.stop()


class GatewayProcess:
    """`tollway serve` in a child process; ended only by its own pid."""

    def __init__(self, config: Path, env: dict[str, str] | None = None, workers: int = 1,
                 data_dir: Path | None = None) -> None:
        self.port, self.admin_port = free_ports(2)
        self.config = config
        defaults = {
            "TOLLWAY_LOG_LEVEL": "warning",
            "TOLLWAY_DATA_DIR": str(data_dir or config.parent / "data"),
            "TOLLWAY_RELOAD_POLL_INTERVAL": "0.1",
        }
        self.env = {**os.environ, **defaults, **(env or {})}
        self.workers = workers
        self.log_path = config.parent / f"gateway-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> GatewayProcess:
        """Spawn and wait until both ports accept connections."""
        self.spawn()
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.stderr()}")
            with contextlib.suppress(OSError), socket.create_connection(
                ("127.0.0.1", self.admin_port), timeout=0.2
            ), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return self
            time.sleep(0.05)  # polling for the port to open; nothing to wait on
        self.kill()
        raise RuntimeError("gateway did not start in time")

    def spawn(self) -> GatewayProcess:
        """Start the process without waiting for it to listen."""
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tollway", "serve", "--config", str(self.config),
             "--host", "127.0.0.1", "--port", str(self.port),
             "--admin-host", "127.0.0.1", "--admin-port", str(self.admin_port),
             "--workers", str(self.workers)],
            # A file, not a pipe: nobody reads a pipe while the test runs, and a
            # full pipe would block the gateway's logging.
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT,
        )
        return self

    def stderr(self) -> str:
        """The last lines the process wrote (stdout and stderr)."""
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.wait(10)
        self.kill()
        self._log.close()


@contextlib.contextmanager
def gateway_process(config: Path, **kwargs: Any) -> Iterator[GatewayProcess]:
    with GatewayProcess(config, **kwargs) as proc:
        yield proc
