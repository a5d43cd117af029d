"""Active health checks: the gateway asks every target on its own, on a schedule.

`probe_http` is hand-written rather than httpx: the data plane avoids httpx, and a
check needs nothing but a status line — one request out, one line back, close.

`ActiveChecker` probes all of a service's targets concurrently every `interval`
and flips `TargetHealth.active_healthy` after `healthy_threshold` /
`unhealthy_threshold` consecutive results. `healthy_threshold` passing checks
after a passive ejection also clear that ejection (Envoy un-ejects on a passing
active check by default; we ask for the same streak that revives an unhealthy
target, so one lucky probe does not undo an ejection).
"""

from __future__ import annotations

import asyncio
import contextlib
import string
import time
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import quote

import structlog

from tollway.config.upstream_schema import ActiveHealthCheck
from tollway.upstream.health import TargetHealth
from tollway.upstream.service import Target

log = structlog.get_logger("tollway.health")

Probe = Callable[[Target, ActiveHealthCheck], Awaitable[tuple[bool, str]]]

# A status line is short; anything longer is not HTTP.
_LINE_LIMIT = 4096


def _request(target: Target, check: ActiveHealthCheck) -> bytes:
    host = check.host if check.host is not None else target.authority.decode("ascii")
    # The schema does not vet `host`: refuse what would split the request.
    if any(c in host for c in "\r\n\0") or not host.isascii():
        raise ValueError("invalid host header")
    # The schema allows non-ASCII paths; a request target must be ASCII.
    path = quote(check.path, safe=string.punctuation)
    return (
        f"GET {path} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        "User-Agent: tollway-health/1\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")


def _healthy(status: int, check: ActiveHealthCheck) -> bool:
    if check.expected_statuses:
        return status in check.expected_statuses
    return 200 <= status <= 399


def _parse_status(line: bytes) -> int | None:
    # "HTTP/1.1 200 OK" — the reason phrase may be empty or missing.
    parts = line.rstrip(b"\r\n").split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        return None
    code = parts[1]
    if len(code) != 3 or not code.isdigit():
        return None
    return int(code)


def _os_detail(exc: OSError) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    return (exc.strerror or str(exc) or type(exc).__name__).lower()


async def probe_http(target: Target, check: ActiveHealthCheck) -> tuple[bool, str]:
    """(healthy, detail): detail is the status ("200") or why there is none ("timeout")."""
    try:
        request = _request(target, check)
    except ValueError as exc:
        return False, str(exc)
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(check.timeout):
            if target.unix_path:
                reader, writer = await asyncio.open_unix_connection(
                    target.unix_path, limit=_LINE_LIMIT
                )
            else:
                reader, writer = await asyncio.open_connection(
                    target.host, target.port, limit=_LINE_LIMIT
                )
            writer.write(request)
            await writer.drain()
            line = await reader.readuntil(b"\n")
    except TimeoutError:
        return False, "timeout"
    except asyncio.IncompleteReadError as exc:
        return False, "closed before a response" if not exc.partial else "bad status line"
    except asyncio.LimitOverrunError:
        return False, "bad status line"
    except OSError as exc:
        return False, _os_detail(exc)
    finally:
        # Closed without reading the rest: the status is all we wanted. Not awaiting
        # wait_closed keeps a slow peer from stretching the probe past its timeout.
        if writer is not None:
            writer.close()
    status = _parse_status(line)
    if status is None:
        return False, "bad status line"
    return _healthy(status, check), str(status)


class ActiveChecker:
    def __init__(
        self,
        check: ActiveHealthCheck,
        targets: Callable[[], Sequence[tuple[Target, TargetHealth]]],
        on_change: Callable[[TargetHealth, bool], None] | None = None,
        probe: Probe = probe_http,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check = check
        # The clock of TargetHealth.ejected_until, read when a check clears an ejection.
        self._clock = clock
        self._targets = targets
        self._on_change = on_change
        self._probe = probe
        self._task: asyncio.Task[None] | None = None

    def reconfigure(self, check: ActiveHealthCheck) -> None:
        # Read on every run: the next run uses the new path, timeout and thresholds,
        # the next sleep the new interval.
        self._check = check

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name="tollway-active-health"
            )

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time()
        while True:
            try:
                await self.run_once()
            except Exception as exc:  # noqa: BLE001
                # Boundary: a failing `targets` or `on_change` callback (the cluster's
                # code) must not end health checking for the life of the service.
                log.error("health_check_run_failed", error=repr(exc))
            interval = self._check.interval
            deadline += interval
            now = loop.time()
            if deadline <= now:
                # Missed ticks are skipped, not run back to back: stay on the grid.
                deadline += interval * (int((now - deadline) // interval) + 1)
            await asyncio.sleep(deadline - now)

    async def run_once(self) -> None:
        check = self._check
        pairs = list(self._targets())
        if not pairs:
            return
        results = await asyncio.gather(*(self._probe_one(t, check) for t, _ in pairs))
        for (_, health), (ok, detail) in zip(pairs, results, strict=True):
            self._apply(health, ok, detail, check)

    async def _probe_one(self, target: Target, check: ActiveHealthCheck) -> tuple[bool, str]:
        try:
            # probe_http bounds itself; a custom probe may not.
            async with asyncio.timeout(check.timeout):
                return await self._probe(target, check)
        except TimeoutError:
            return False, "timeout"
        except Exception as exc:  # noqa: BLE001
            # Boundary: the probe is pluggable, and one target's bug must neither stop
            # the loop nor hide the other targets' results. It counts as a failure.
            log.warning("health_probe_error", target=target.key, error=repr(exc))
            return False, f"probe error: {type(exc).__name__}"

    def _apply(self, health: TargetHealth, ok: bool, detail: str, check: ActiveHealthCheck) -> None:
        health.last_check = detail
        health.last_check_ok = ok
        if ok:
            health.active_failures = 0
            health.active_successes += 1
            if health.active_successes < check.healthy_threshold:
                return
            health.clear_ejection(self._clock())
            if not health.active_healthy:
                health.active_healthy = True
                log.info("target_healthy", target=health.key, detail=detail)
                if self._on_change is not None:
                    self._on_change(health, True)
        else:
            health.active_successes = 0
            health.active_failures += 1
            if health.active_healthy and health.active_failures >= check.unhealthy_threshold:
                health.active_healthy = False
                log.info("target_unhealthy", target=health.key, detail=detail)
                if self._on_change is not None:
                    self._on_change(health, False)
