"""Run an ASGI app on uvicorn inside the gateway's already running event loop.

uvicorn's `Server.serve()` owns the process: it installs SIGINT/SIGTERM handlers
(`capture_signals`) and answers a bind failure with `sys.exit`. The gateway owns
its signals (SIGTERM drains, SIGHUP reloads), so this drives the same public steps
`serve()` takes (`Config.load`, `Server.startup`, `main_loop`, `shutdown`) without
`capture_signals`, and binds the listening socket itself so that a taken port is a
clear exception, port 0 reports the port it got, and a unix socket left behind by a
crashed run is replaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import socket
import stat
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

from tollway.admin.errors import ServerStartError
from tollway.observability.logging import get_logger

_log = get_logger("tollway.admin.server")


class EmbeddedServer:
    """One uvicorn server on a TCP host:port or a unix socket, in the current loop."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        uds: Path | None = None,
        name: str = "admin",
        shutdown_timeout: int = 10,
        proxy_headers: bool = False,
        backlog: int = 2048,
    ) -> None:
        self._app = app
        self._host = host
        self._port = port
        self._uds = uds
        self._name = name
        self._shutdown_timeout = shutdown_timeout
        self._proxy_headers = proxy_headers
        self._backlog = backlog
        self._server: uvicorn.Server | None = None
        self._socket: socket.socket | None = None
        self._main_loop: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (useful with port 0); 0 for a unix socket."""
        if self._socket is None or self._uds is not None:
            return 0
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        if self._uds is not None:
            return f"unix:{self._uds}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self.port}"

    async def start(self) -> None:
        """Return once the server accepts connections; raise ServerStartError if not."""
        if self._server is not None:
            raise RuntimeError(f"{self._name} server already started")
        sock = self._bind()
        config = uvicorn.Config(
            self._app,
            host=self._host,
            port=self._port,
            uds=str(self._uds) if self._uds is not None else None,
            lifespan="on",
            # No app served here has a WebSocket route, and uvicorn's WebSocket
            # protocol would load the websockets package (20 modules, about 0.5 MB
            # of a serving gateway). An upgrade request is answered as plain HTTP.
            ws="none",
            # Logging is configured once by tollway.observability.logging; uvicorn's
            # records propagate to that root handler.
            log_config=None,
            access_log=False,
            proxy_headers=self._proxy_headers,
            timeout_graceful_shutdown=self._shutdown_timeout,
            backlog=self._backlog,
        )
        config.load()
        server = uvicorn.Server(config)
        # `Server._serve()` creates the lifespan right before `startup()`; we call
        # `startup()` ourselves, so we do the same.
        server.lifespan = config.lifespan_class(config)
        try:
            await server.startup(sockets=[sock])
        except SystemExit as exc:
            # uvicorn exits the process when the app's lifespan startup fails.
            sock.close()
            raise ServerStartError(f"{self._name} app failed to start (see the log)") from exc
        self._server = server
        self._socket = sock
        self._main_loop = asyncio.create_task(_tick(server), name=f"{self._name}-uvicorn")
        _log.info("server_listening", server=self._name, url=self.url)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish, run the app's shutdown."""
        server, sock, main_loop = self._server, self._socket, self._main_loop
        if server is None or sock is None or main_loop is None:
            return
        server.should_exit = True
        main_loop.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await main_loop
        await server.shutdown(sockets=[sock])
        self._server = self._socket = self._main_loop = None
        if self._uds is not None:
            with contextlib.suppress(FileNotFoundError):
                self._uds.unlink()

    def _bind(self) -> socket.socket:
        if self._uds is not None:
            return self._bind_unix(self._uds)
        try:
            infos = socket.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            family = infos[0][0]
            return socket.create_server(
                (self._host, self._port), family=family, backlog=self._backlog
            )
        except OSError as exc:
            reason = "address already in use" if exc.errno == errno.EADDRINUSE else str(exc)
            raise ServerStartError(
                f"{self._name} server cannot listen on {self._host}:{self._port}: {reason}"
            ) from exc

    def _bind_unix(self, path: Path) -> socket.socket:
        if path.exists():
            if not stat.S_ISSOCK(path.stat().st_mode):
                raise ServerStartError(
                    f"{self._name} socket path {path} exists and is not a socket"
                )
            if _unix_socket_in_use(path):
                raise ServerStartError(
                    f"{self._name} server cannot listen on {path}: another process serves it"
                )
            path.unlink()
        path.parent.mkdir(parents=True, exist_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            # Only this user (the gateway) may talk to an internal app directly.
            os.chmod(path, 0o600)
            sock.listen(self._backlog)
        except OSError as exc:
            sock.close()
            raise ServerStartError(f"{self._name} server cannot listen on {path}: {exc}") from exc
        sock.setblocking(False)
        return sock


def _unix_socket_in_use(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        return False
    finally:
        probe.close()
    return True


async def _tick(server: uvicorn.Server) -> None:
    """uvicorn's own `main_loop` wakes ten times a second: to refresh its Date header,
    which it does once a second, and to look at `should_exit`, which `stop()` makes
    unnecessary by cancelling this task. Once a second keeps the Date header as fresh
    and takes nine wake-ups a second off every idle process."""
    while True:
        await server.on_tick(0)  # counter 0: the once-a-second branch
        await asyncio.sleep(1.0)
