"""The gateway process: data plane, admin API, config reload, signals and workers.

`serve(settings)` is what `tollway serve` runs. With one worker everything lives in
one process and one event loop. With `--workers N` the parent serves the admin API
and forks N data-plane workers that each bind the proxy port with SO_REUSEPORT;
metrics then go through prometheus_client's multiprocess files so that /metrics
sums every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import gc
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
import uvloop

from tollway.admin.errors import ServerStartError
from tollway.admin.token import AdminToken, AdminTokenError, load_admin_token
from tollway.config.errors import ConfigError
from tollway.config.loader import load_config
from tollway.config.reload import ConfigWatcher
from tollway.config.schema import GatewayConfig, ServiceConfig
from tollway.config.snapshot import Snapshot, build_snapshot
from tollway.gateway.dataplane import DataPlane
from tollway.identity.apikeys import PepperError
from tollway.observability import metrics as metrics_mod
from tollway.observability.abuse_metrics import AbuseMetrics
from tollway.observability.health import HealthRegistry
from tollway.observability.logging import configure_logging
from tollway.observability.upstream_metrics import UpstreamMetrics
from tollway.plugins.rate_limit import config_uses_rate_limits, unshared_limits_problem
from tollway.runtime import (
    DatabaseUnavailable,
    Runtime,
    database_errors,
    database_for,
    open_runtime,
)
from tollway.settings import Settings
from tollway.storage.migrate import upgrade
from tollway.upstream.clusters import ClusterManager
from tollway.upstream.probe import probe_services

if TYPE_CHECKING:
    from tollway.admin.server import EmbeddedServer

log = structlog.get_logger("tollway.app")

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def load_snapshot(
    settings: Settings,
    generation: int = 1,
    allow_empty: bool = True,
    runtime: Runtime | None = None,
) -> Snapshot:
    """Load and compile the configured file (or an empty config)."""
    if settings.config is None:
        return build_snapshot(GatewayConfig(), generation, source=None, runtime=runtime)
    config = load_config(settings.config, allow_empty=allow_empty)
    return build_snapshot(config, generation, source=str(settings.config), runtime=runtime)


class Gateway:
    """One process's gateway. Tests start it in-process; `serve` runs it for real."""

    def __init__(
        self,
        settings: Settings,
        *,
        serve_admin: bool = True,
        serve_proxy: bool = True,
        reuse_port: bool = False,
        metrics: metrics_mod.GatewayMetrics | None = None,
        migrate: bool = True,
    ) -> None:
        self.settings = settings
        self.serve_admin = serve_admin
        self.serve_proxy = serve_proxy
        self.reuse_port = reuse_port
        # False under `tollway serve`, which migrated in a child before serving;
        # True for a gateway embedded in-process (tests), which migrates itself.
        self.migrate = migrate
        self.runtime: Runtime | None = None
        self.metrics = metrics or metrics_mod.GatewayMetrics()
        self.health = HealthRegistry(workers=settings.workers)
        self.plane: DataPlane | None = None
        self.clusters = ClusterManager()
        self.admin: EmbeddedServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.snapshot: Snapshot | None = None
        self.port = 0
        self.admin_port = 0
        self.reloads = 0
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        self.runtime = await open_runtime(
            self.settings, data_plane=self.serve_proxy, migrate=self.migrate
        )
        if self.runtime.usage is not None:
            self.metrics.set_usage_stats_source(self.runtime.usage.counters)
        if self.runtime.limits is not None:
            self.metrics.set_limit_stats_source(self.runtime.limits.stats)
        if self.runtime.bans is not None:
            self.metrics.add_exporter(AbuseMetrics(self.runtime.bans.counters).flush)
        try:
            self.snapshot = load_snapshot(self.settings, runtime=self.runtime)
        except BaseException:
            # A refused config: nothing else started yet, but the runtime's
            # connections must not outlive this failed start.
            await self.runtime.close(0)
            raise
        self.health.set_config_loaded(True)
        loop = asyncio.get_running_loop()
        if self.serve_proxy:
            self.plane = DataPlane(self.settings, self.snapshot, self.metrics, loop)
            self.metrics.set_pool_stats_source(self.plane.pools.stats)
            self.clusters = self.plane.clusters
            self.metrics.add_exporter(UpstreamMetrics(self.clusters.stats).flush)
        else:
            # The parent of workers keeps clusters too, for /upstreams and the active
            # checks' view; passive health and breakers live in each worker.
            self.clusters.apply(self.snapshot.services)
        await self.clusters.connect_shared(
            self.runtime.database, self.runtime.redis,
            f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}",
        )
        if self.plane is not None:
            self.port = await self.plane.listen(
                self.settings.host, self.settings.port, self.reuse_port
            )
        # Not required for readiness: one upstream down must not take the gateway
        # out of its load balancer.
        self.health.add_check("upstreams", self._upstream_health, required=False)
        self.metrics.start_flusher(loop)
        if self.serve_admin:
            try:
                token = load_admin_token(self.settings)
            except AdminTokenError as exc:
                raise ServerStartError(str(exc)) from exc
            if token.generated:
                _announce_admin_token(token)
            # Imported here: FastAPI, uvicorn and the admin routers cost a data-plane
            # worker (which never serves them) about 11 MB of resident memory.
            from tollway.admin.app import AdminState, create_admin_app
            from tollway.admin.server import EmbeddedServer

            state = AdminState(
                settings=self.settings,
                health=self.health,
                metrics_render=self.metrics.render,
                snapshot_info=self._snapshot_info,
                runtime=self.runtime,
                admin_token=token.value,
                service_configs=self._service_configs,
                upstreams=self._upstreams_state,
            )
            self.admin = EmbeddedServer(
                create_admin_app(state),
                host=self.settings.admin_host,
                port=self.settings.admin_port,
            )
            await self.admin.start()
            self.admin_port = self.admin.port
        if self.settings.config is not None:
            self.watcher = ConfigWatcher(
                self.settings.config,
                self._on_config_change,
                interval=self.settings.reload_poll_interval,
                handle_sighup=True,
                loop=loop,
            )
            self.watcher.start()

    def _service_configs(self) -> dict[str, ServiceConfig]:
        snapshot = self.snapshot
        return {} if snapshot is None else {s.name: s for s in snapshot.config.services}

    def _upstreams_state(self) -> dict[str, Any]:
        return self.clusters.describe(asyncio.get_running_loop().time())

    def _snapshot_info(self) -> dict[str, Any]:
        info = self.snapshot.summary() if self.snapshot else {}
        info["reloads"] = self.reloads
        return info

    async def _upstream_health(self) -> dict[str, Any]:
        """Every target of every service: reachable now, connect latency, pool use."""
        snapshot = self.snapshot
        if snapshot is None:
            return {}
        report: dict[str, Any] = {
            "services": await probe_services(snapshot.services),
            "clusters": self._upstreams_state(),
        }
        if self.plane is not None:
            report["pools"] = {
                key: {"idle": idle, "in_use": in_use}
                for key, (idle, in_use) in self.plane.pools.stats().items()
            }
        return report

    def _on_config_change(self) -> None:
        self.reload()

    def reload(self) -> bool:
        """Rebuild the snapshot from the file and swap it in; keep the old on error."""
        assert self.snapshot is not None
        try:
            snapshot = load_snapshot(
                self.settings,
                self.snapshot.generation + 1,
                allow_empty=False,
                runtime=self.runtime,
            )
        except ConfigError as exc:
            if self.serve_proxy:
                self.metrics.reload(False)
            log.error(
                "config reload refused; the previous config stays",
                source=str(self.settings.config),
                errors=[str(i) for i in exc.issues],
            )
            return False
        except OSError as exc:
            if self.serve_proxy:
                self.metrics.reload(False)
            log.error("config reload failed: cannot read the file", error=str(exc))
            return False
        self.snapshot = snapshot
        if self.plane is not None:
            self.plane.swap(snapshot)
        else:
            self.clusters.apply(snapshot.services)
        self.reloads += 1
        # With workers, the parent reloads too (for /health and /status); only the
        # data-plane processes count, so that one change counts once per worker.
        if self.serve_proxy:
            self.metrics.reload(True)
        log.info("config reloaded", **snapshot.summary())
        return True

    async def stop(self) -> int:
        """Graceful: stop accepting, finish in-flight requests up to the deadline."""
        if self.watcher is not None:
            self.watcher.stop()
        cut = 0
        if self.plane is not None:
            cut = await self.plane.shutdown(self.settings.shutdown_timeout)
        if self.admin is not None:
            await self.admin.stop()
        if self.plane is None:
            await self.clusters.aclose()
        if self.runtime is not None:
            # After the data plane: the last requests' usage records are queued.
            await self.runtime.close(self.settings.shutdown_timeout)
        self.metrics.stop()
        self.stopped.set()
        return cut


def _announce_admin_token(token: AdminToken) -> None:
    """Once, when the token was just generated: the only time the server shows it.

    stderr, not the log: log lines are shipped and kept, and this is a secret.
    """
    print(
        f"Tollway generated an admin token and stored it in {token.path} (mode 0600):\n\n"
        f"    {token.value}\n\n"
        "Send it to the admin API as `Authorization: Bearer <token>`. Later starts read\n"
        "that file and do not print it; `tollway admin-token` shows it again.",
        file=sys.stderr,
        flush=True,
    )


def _install_stop_signals(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _freeze_startup_objects() -> None:
    """Move everything built at start (modules, config, SQLAlchemy and FastAPI
    objects: most of the heap) out of the collector's reach. A full collection
    otherwise walks them all again and again while requests allocate, a pause
    that grows with every module a process holds."""
    gc.collect()
    gc.freeze()


async def _run_single(settings: Settings, on_ready: Callable[[], None] | None) -> int:
    gateway = Gateway(settings, migrate=False)  # serve() migrated in a child
    await gateway.start()
    log.info(
        "tollway listening",
        proxy=f"{settings.host}:{gateway.port}",
        admin=f"{settings.admin_host}:{gateway.admin_port}",
        pid=os.getpid(),
    )
    if on_ready is not None:
        on_ready()
    _freeze_startup_objects()
    stop = asyncio.Event()
    _install_stop_signals(asyncio.get_running_loop(), stop)
    await stop.wait()
    log.info("shutting down", deadline_s=settings.shutdown_timeout)
    cut = await gateway.stop()
    log.info("stopped", connections_cut=cut)
    return 0


async def _run_worker(settings: Settings) -> int:
    gateway = Gateway(settings, serve_admin=False, reuse_port=True, migrate=False)
    await gateway.start()
    _freeze_startup_objects()
    stop = asyncio.Event()
    _install_stop_signals(asyncio.get_running_loop(), stop)
    await stop.wait()
    await gateway.stop()
    return 0


async def _run_parent(
    settings: Settings, children: list[int], on_ready: Callable[[], None] | None
) -> int:
    """The parent of N workers: admin API, signal forwarding, worker supervision."""
    gateway = Gateway(settings, serve_proxy=False, migrate=False)
    await gateway.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    _install_stop_signals(loop, stop)

    def forward(sig: int) -> None:
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    loop.add_signal_handler(signal.SIGHUP, forward, signal.SIGHUP)
    if on_ready is not None:
        on_ready()
    exit_code = 0
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)
        for pid in list(children):
            done, status = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: no wait)
            if done:
                children.remove(pid)
                metrics_mod.worker_exited(pid)
                log.error("worker exited", pid=pid, status=status)
                exit_code = 1
        if not children:
            break
    forward(signal.SIGTERM)
    deadline = loop.time() + _worker_exit_budget(settings)
    while children and loop.time() < deadline:
        for pid in list(children):
            done, _ = os.waitpid(pid, os.WNOHANG)  # noqa: ASYNC222 (WNOHANG: no wait)
            if done:
                children.remove(pid)
                metrics_mod.worker_exited(pid)
        await asyncio.sleep(0.05)  # waiting on child exits: nothing to await on
    forward(signal.SIGKILL)
    await gateway.stop()
    return exit_code


def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
    """Run the gateway until SIGTERM/SIGINT. Returns the process exit code."""
    configure_logging(settings.log_level, settings.log_format)
    try:
        snapshot = load_snapshot(settings)  # refuse a bad config before forking anything
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"config error: {issue}", file=sys.stderr)
        return 2
    problem = unshared_limits_problem(settings)
    if problem is not None and config_uses_rate_limits(snapshot.config):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if (
        settings.workers > 1
        and not settings.redis_url
        and any(p.name == "abuse-detection" and p.enabled for p in snapshot.config.plugins)
    ):
        # Not refused: a ban per worker still stops a flood, only later.
        log.warning(
            "abuse-detection without Redis counts per worker: a source may fail up to "
            f"{settings.workers} times the threshold before every worker bans it, and "
            "/bans on the admin API cannot see the workers' bans; set TOLLWAY_REDIS_URL"
        )
    # Migrate once, before any worker exists, so that workers never race over the
    # schema; in a child of its own, so that Alembic and the migration's garbage
    # (12 MB or more) stay out of the serving processes.
    code = _in_child(lambda: _startup_errors_as_exit(lambda: uvloop.run(_migrate(settings))))
    if code:
        return code
    if settings.workers == 1:
        metrics_mod.setup_multiprocess(None)
        return _startup_errors_as_exit(lambda: uvloop.run(_run_single(settings, on_ready)))
    metrics_dir = Path(settings.data_dir) / "metrics"
    metrics_mod.setup_multiprocess(metrics_dir)
    children: list[int] = []
    for _ in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                _die_with_parent()
                code = uvloop.run(_run_worker(settings))
            finally:
                os._exit(code)
        children.append(pid)
    try:
        return _startup_errors_as_exit(
            lambda: uvloop.run(_run_parent(settings, children, on_ready))
        )
    finally:
        # However the parent ends (its admin port taken, a crash), no worker may
        # outlive it holding the proxy port.
        _end_children(children, _worker_exit_budget(settings))


async def _migrate(settings: Settings) -> int:
    database = database_for(settings)
    try:
        with database_errors(settings):
            await upgrade(database)
    finally:
        await database.dispose()
    return 0


def _in_child(run: Callable[[], int]) -> int:
    """Run `run` in a forked child and return its exit code."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = run()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _worker_exit_budget(settings: Settings) -> float:
    """How long a worker may take to exit after SIGTERM before it is killed.

    It drains in-flight requests (up to shutdown_timeout), then flushes its usage
    queue (up to shutdown_timeout again): killing it sooner loses usage rows.
    """
    return 2 * settings.shutdown_timeout + 5


def _startup_errors_as_exit(run: Callable[[], int]) -> int:
    """A port that cannot be bound is an operator's problem to read, not a traceback."""
    try:
        return run()
    except (ServerStartError, PepperError, DatabaseUnavailable, OSError) as exc:
        log.error("tollway could not start", error=str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM to this worker when its parent dies."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: the parent's own cleanup still ends its workers
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGTERM)  # the parent died before prctl ran


def _end_children(children: list[int], grace: float) -> None:
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while children and time.monotonic() < deadline:
        for pid in list(children):
            with contextlib.suppress(ChildProcessError):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if not done:
                    continue
            children.remove(pid)
        time.sleep(0.05)  # outside any event loop: polling child exits
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
