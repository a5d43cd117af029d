"""Active HTTP health checks against real servers on loopback (and a unix socket)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from support.clock import FakeClock
from tollway.config.upstream_schema import ActiveHealthCheck
from tollway.upstream.active_check import ActiveChecker, probe_http
from tollway.upstream.health import TargetHealth
from tollway.upstream.service import Target

WAIT = 5.0  # generous bound on every wait: a loaded CI box must not flake


class HealthServer:
    """Answers each request with `status` (or never, when `hang`), records the raw head.

    It also notices when the prober closes its end, to prove the socket is closed.
    """

    def __init__(self, status: int = 200, hang: bool = False) -> None:
        self.status = status
        self.hang = hang
        self.heads: asyncio.Queue[bytes] = asyncio.Queue()
        self.requests = 0
        self.closed = 0
        self.closed_event = asyncio.Event()
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self.requests += 1
            self.heads.put_nowait(head)
            if not self.hang:
                writer.write(f"HTTP/1.1 {self.status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
            # Until the prober closes: EOF (or a reset) proves it did.
            await reader.read()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self.closed += 1
            self.closed_event.set()
            writer.close()

    async def start(self) -> HealthServer:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def start_unix(self, path: str) -> HealthServer:
        self._server = await asyncio.start_unix_server(self._handle, path)
        return self

    @property
    def target(self) -> Target:
        return Target("127.0.0.1", self.port)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def server() -> AsyncIterator[HealthServer]:
    srv = await HealthServer().start()
    yield srv
    await srv.stop()


def check(**kw: object) -> ActiveHealthCheck:
    base: dict[str, object] = {
        "path": "/health", "timeout": 0.05,
        "healthy_threshold": 2, "unhealthy_threshold": 2,
    }
    base.update(kw)
    # A probe-only test gives a long timeout; the interval must be at least that.
    base.setdefault("interval", base["timeout"])
    return ActiveHealthCheck.model_validate(base)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Changes:
    """on_change recorder; `wait_for(value)` waits on an event, never a bare sleep."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool]] = []
        self._event = asyncio.Event()

    def __call__(self, health: TargetHealth, healthy: bool) -> None:
        self.calls.append((health.key, healthy))
        self._event.set()

    async def wait_for(self, healthy: bool) -> None:
        async with asyncio.timeout(WAIT):
            while not self.calls or self.calls[-1][1] is not healthy:
                self._event.clear()
                await self._event.wait()


# -- probe_http -------------------------------------------------------------------


async def test_probe_200_is_healthy_and_closes(server: HealthServer) -> None:
    assert await probe_http(server.target, check(timeout=1.0)) == (True, "200")
    await asyncio.wait_for(server.closed_event.wait(), WAIT)


@pytest.mark.parametrize(
    ("status", "healthy"), [(204, True), (302, True), (404, False), (503, False)]
)
async def test_probe_default_statuses_are_2xx_3xx(
    server: HealthServer, status: int, healthy: bool
) -> None:
    server.status = status
    assert await probe_http(server.target, check(timeout=1.0)) == (healthy, str(status))


async def test_probe_expected_statuses_honoured(server: HealthServer) -> None:
    c = check(timeout=1.0, expected_statuses=(200, 418))
    server.status = 418
    assert await probe_http(server.target, c) == (True, "418")
    server.status = 204
    assert await probe_http(server.target, c) == (False, "204")


async def test_probe_sends_path_and_configured_host(server: HealthServer) -> None:
    ok, _ = await probe_http(server.target, check(timeout=1.0, path="/status?deep=1",
                                                  host="health.internal"))
    assert ok
    head = server.heads.get_nowait()
    assert head == (
        b"GET /status?deep=1 HTTP/1.1\r\nHost: health.internal\r\n"
        b"User-Agent: tollway-health/1\r\nConnection: close\r\n\r\n"
    )


async def test_probe_host_defaults_to_target_authority(server: HealthServer) -> None:
    await probe_http(server.target, check(timeout=1.0))
    head = server.heads.get_nowait()
    assert f"\r\nHost: 127.0.0.1:{server.port}\r\n".encode() in head
    assert head.startswith(b"GET /health HTTP/1.1\r\n")


async def test_a_host_that_would_split_the_request_is_refused(server: HealthServer) -> None:
    # The config refuses it; a check built around validation is refused by the probe.
    with pytest.raises(ValueError, match="host name"):
        check(timeout=1.0, host="a\r\nX-Evil: 1")
    evil = ActiveHealthCheck.model_construct(
        **{**check(timeout=1.0).__dict__, "host": "a\r\nX-Evil: 1"}
    )
    ok, detail = await probe_http(server.target, evil)
    assert not ok and "host" in detail
    assert server.requests == 0


async def test_probe_timeout_when_never_answered() -> None:
    srv = await HealthServer(hang=True).start()
    try:
        assert await probe_http(srv.target, check(timeout=0.1, interval=1.0)) == (
            False, "timeout"
        )
        # The socket was closed on the timeout: the server sees EOF.
        await asyncio.wait_for(srv.closed_event.wait(), WAIT)
        assert srv.requests == 1
    finally:
        await srv.stop()


async def test_probe_connection_refused_on_a_closed_port() -> None:
    target = Target("127.0.0.1", closed_port())
    assert await probe_http(target, check(timeout=1.0)) == (False, "connection refused")


async def test_probe_closed_before_a_response() -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    srv = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    try:
        target = Target("127.0.0.1", srv.sockets[0].getsockname()[1])
        assert await probe_http(target, check(timeout=1.0)) == (False, "closed before a response")
    finally:
        srv.close()


async def test_probe_not_http_is_unhealthy() -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.0\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    srv = await asyncio.start_server(garbage, "127.0.0.1", 0)
    try:
        target = Target("127.0.0.1", srv.sockets[0].getsockname()[1])
        assert await probe_http(target, check(timeout=1.0)) == (False, "bad status line")
    finally:
        srv.close()


async def test_probe_over_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "up.sock")
    srv = await HealthServer(status=200).start_unix(path)
    try:
        target = Target("localhost", 0, 100, path)
        assert await probe_http(target, check(timeout=1.0)) == (True, "200")
        assert b"\r\nHost: localhost\r\n" in srv.heads.get_nowait()
    finally:
        await srv.stop()


# -- ActiveChecker ----------------------------------------------------------------


async def test_thresholds_both_ways_and_one_change_per_flip(server: HealthServer) -> None:
    health = TargetHealth(server.target.key)
    changes = Changes()
    checker = ActiveChecker(check(timeout=1.0, interval=1.0, healthy_threshold=2,
                                  unhealthy_threshold=3),
                            lambda: [(server.target, health)], changes)
    server.status = 503
    for _ in range(2):
        await checker.run_once()
    assert health.active_healthy and changes.calls == []
    await checker.run_once()
    assert not health.active_healthy
    assert changes.calls == [(health.key, False)]
    await checker.run_once()  # still failing: no second event
    assert changes.calls == [(health.key, False)]
    assert health.last_check == "503" and health.last_check_ok is False

    server.status = 200
    await checker.run_once()
    assert not health.active_healthy
    await checker.run_once()
    assert health.active_healthy and health.available(0.0)
    await checker.run_once()
    assert changes.calls == [(health.key, False), (health.key, True)]


async def test_a_success_breaks_a_failure_streak(server: HealthServer) -> None:
    health = TargetHealth(server.target.key)
    checker = ActiveChecker(check(timeout=1.0, interval=1.0),
                            lambda: [(server.target, health)])
    for status in (503, 200, 503, 200, 503):
        server.status = status
        await checker.run_once()
    assert health.active_healthy


async def test_passing_checks_clear_a_passive_ejection(server: HealthServer) -> None:
    clock = FakeClock(1000.0)
    health = TargetHealth(server.target.key, active_healthy=False, ejected_until=1100.0)
    changes = Changes()
    checker = ActiveChecker(check(timeout=1.0, interval=1.0),
                            lambda: [(server.target, health)], changes, clock=clock)
    await checker.run_once()
    assert health.ejected_until == 1100.0  # one pass is not the streak
    await checker.run_once()
    assert health.ejected_until == 0.0 and health.available(clock())
    assert changes.calls == [(health.key, True)]
    # The multiplier's decay counts from the un-ejection.
    assert health.decay_from == 1000.0


async def test_passing_checks_clear_the_ejection_of_a_healthy_target(
    server: HealthServer,
) -> None:
    clock = FakeClock(1000.0)
    health = TargetHealth(server.target.key, ejected_until=1100.0)
    changes = Changes()
    checker = ActiveChecker(check(timeout=1.0, interval=1.0),
                            lambda: [(server.target, health)], changes, clock=clock)
    await checker.run_once()
    await checker.run_once()
    assert health.available(clock())
    assert changes.calls == []  # active state did not flip


async def test_targets_added_and_removed_between_runs() -> None:
    a = await HealthServer(status=200).start()
    b = await HealthServer(status=503).start()
    try:
        ha, hb = TargetHealth(a.target.key), TargetHealth(b.target.key)
        current = [(a.target, ha)]
        checker = ActiveChecker(check(timeout=1.0, interval=1.0, unhealthy_threshold=1),
                                lambda: current)
        await checker.run_once()
        assert (a.requests, b.requests) == (1, 0)
        current.append((b.target, hb))
        await checker.run_once()
        assert (a.requests, b.requests) == (2, 1)
        assert ha.active_healthy and not hb.active_healthy
        current.remove((a.target, ha))
        await checker.run_once()
        assert (a.requests, b.requests) == (2, 2)
        current.clear()
        await checker.run_once()  # nothing to probe is fine
    finally:
        await a.stop()
        await b.stop()


async def test_probes_run_concurrently() -> None:
    # Three hanging targets with a 0.3 s timeout: serially that would take 0.9 s.
    servers = [await HealthServer(hang=True).start() for _ in range(3)]
    try:
        pairs = [(s.target, TargetHealth(s.target.key)) for s in servers]
        checker = ActiveChecker(check(timeout=0.3, interval=1.0), lambda: pairs)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await checker.run_once()
        assert loop.time() - start < 0.85
        assert all(h.last_check == "timeout" for _, h in pairs)
    finally:
        for s in servers:
            await s.stop()


async def test_loop_flips_against_a_real_server(server: HealthServer) -> None:
    health = TargetHealth(server.target.key)
    changes = Changes()
    checker = ActiveChecker(check(), lambda: [(server.target, health)], changes)
    server.status = 503
    checker.start()
    try:
        await changes.wait_for(False)
        assert not health.active_healthy
        server.status = 200
        await changes.wait_for(True)
        assert health.active_healthy
        assert changes.calls == [(health.key, False), (health.key, True)]
    finally:
        await checker.aclose()


async def test_loop_survives_a_probe_that_raises(server: HealthServer) -> None:
    bad, good = Target("127.0.0.1", 1), server.target
    hbad, hgood = TargetHealth(bad.key), TargetHealth(good.key)
    calls: dict[str, int] = {bad.key: 0, good.key: 0}
    enough = asyncio.Event()

    async def probe(target: Target, c: ActiveHealthCheck) -> tuple[bool, str]:
        calls[target.key] += 1
        if min(calls.values()) >= 4:
            enough.set()
        if target is bad:
            raise RuntimeError("boom")
        return await probe_http(target, c)

    checker = ActiveChecker(check(), lambda: [(bad, hbad), (good, hgood)], probe=probe)
    checker.start()
    try:
        await asyncio.wait_for(enough.wait(), WAIT)
    finally:
        await checker.aclose()
    assert not hbad.active_healthy and hbad.last_check == "probe error: RuntimeError"
    assert hgood.active_healthy and hgood.last_check == "200"


async def test_a_probe_that_hangs_counts_as_a_timeout() -> None:
    async def forever(target: Target, c: ActiveHealthCheck) -> tuple[bool, str]:
        await asyncio.Event().wait()
        raise AssertionError

    health = TargetHealth("10.0.0.1:80")
    checker = ActiveChecker(check(timeout=0.05, unhealthy_threshold=1),
                            lambda: [(Target("10.0.0.1", 80), health)], probe=forever)
    await asyncio.wait_for(checker.run_once(), WAIT)
    assert health.last_check == "timeout" and not health.active_healthy


async def test_loop_survives_a_failing_callback(server: HealthServer) -> None:
    runs = 0
    again = asyncio.Event()

    def targets() -> list[tuple[Target, TargetHealth]]:
        nonlocal runs
        runs += 1
        if runs >= 3:
            again.set()
        raise RuntimeError("cluster bug")

    checker = ActiveChecker(check(), targets)
    checker.start()
    try:
        await asyncio.wait_for(again.wait(), WAIT)
    finally:
        await checker.aclose()


async def test_loop_keeps_its_interval_despite_slow_probes() -> None:
    loop = asyncio.get_running_loop()
    starts: list[float] = []
    six = asyncio.Event()

    async def slow(target: Target, c: ActiveHealthCheck) -> tuple[bool, str]:
        starts.append(loop.time())
        if len(starts) >= 6:
            six.set()
        await asyncio.sleep(0.08)  # the probe's own work, not a wait for the test
        return True, "200"

    checker = ActiveChecker(check(interval=0.1, timeout=0.1),
                            lambda: [(Target("10.0.0.1", 80), TargetHealth("10.0.0.1:80"))],
                            probe=slow)
    checker.start()
    try:
        await asyncio.wait_for(six.wait(), WAIT)
    finally:
        await checker.aclose()
    # Scheduled on a monotonic grid: 5 intervals take 0.5 s; drifting would take 0.9 s.
    assert starts[5] - starts[0] < 0.75


async def test_aclose_stops_the_loop_and_is_idempotent(server: HealthServer) -> None:
    probed = asyncio.Event()

    async def probe(target: Target, c: ActiveHealthCheck) -> tuple[bool, str]:
        probed.set()
        return await probe_http(target, c)

    checker = ActiveChecker(check(), lambda: [(server.target, TargetHealth("x"))], probe=probe)
    await checker.aclose()  # never started: fine
    checker.start()
    await asyncio.wait_for(probed.wait(), WAIT)
    await checker.aclose()
    await checker.aclose()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "tollway-active-health"]


async def test_reconfigure_applies_to_the_next_run(server: HealthServer) -> None:
    health = TargetHealth(server.target.key)
    checker = ActiveChecker(check(timeout=1.0, interval=1.0),
                            lambda: [(server.target, health)])
    await checker.run_once()
    checker.reconfigure(check(timeout=1.0, interval=1.0, path="/ready",
                              expected_statuses=(204,)))
    await checker.run_once()
    assert server.heads.get_nowait().startswith(b"GET /health ")
    assert server.heads.get_nowait().startswith(b"GET /ready ")
    assert health.last_check == "200" and health.last_check_ok is False
