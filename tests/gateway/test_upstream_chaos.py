"""The upstreams issue's chaos test: three targets, one turns to 500s, one is blackholed.

While 20,000 GET requests run through the gateway, target B starts answering 500
to everything and target C's network goes dark (the fault relay swallows every
byte, open connections included); later both recover. No client request may
fail (a target was always up); the broken targets must leave the balancer within
the configured thresholds and come back within one health interval of recovering.
The timeline is printed (`pytest -s` shows it).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from support.gateway import running_gateway
from support.relay import FaultRelay
from support.upstream import Received, RecordingUpstream, Reply

# Sub-second bounds: a full collection of a late-run heap must not stall them.
pytestmark = pytest.mark.usefixtures("frozen_heap")

TOTAL = 20_000
CONCURRENCY = 16
# Request counts at which the faults start and end.
FAULT_500_AT = 3_000
BLACKHOLE_AT = 5_000
RECOVER_AT = 12_000

INTERVAL = 0.2  # active health check interval
PROBE_TIMEOUT = 0.1
UNHEALTHY_THRESHOLD = 2
CONSECUTIVE_5XX = 3
READ_TIMEOUT = 0.5

CONFIG = """
services:
  - name: chaos
    targets:
      - {{target: "127.0.0.1:{a}"}}
      - {{target: "127.0.0.1:{b}"}}
      - {{target: "127.0.0.1:{c}"}}
    balancer: round_robin
    connect_timeout: 0.3s
    read_timeout: {read}s
    healthchecks:
      active:
        path: /health
        interval: {interval}s
        timeout: {probe}s
        healthy_threshold: 1
        unhealthy_threshold: {unhealthy}
      passive:
        consecutive_5xx: {c5xx}
        consecutive_failures: 2
        base_ejection_time: 1s
        max_ejection_time: 5s
        max_ejection_percent: 67
    retries:
      attempts: 3
      on_statuses: [500, 502, 503, 504]
      backoff_base: 1ms
      backoff_max: 5ms
routes:
  - name: chaos
    service: chaos
    paths: [/]
"""


class Switch:
    """A target's handler: 200, or 500 while `failing`."""

    def __init__(self) -> None:
        self.failing = False
        self.served = 0
        self.failed = 0

    async def __call__(self, req: Received, reply: Reply) -> None:
        if self.failing:
            self.failed += 1
            reply.send(500, [("content-type", "text/plain")], b"broken")
        else:
            if req.target != "/health":
                self.served += 1
            reply.send(200, [("content-type", "text/plain")], b"ok")


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: bytes) -> int:
    writer.write(b"GET " + path + b" HTTP/1.1\r\nHost: chaos\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    await reader.readexactly(length)
    return status


async def test_chaos_two_targets_fail_and_recover_without_a_failed_request(
    tmp_path: Path,
) -> None:
    switches = [Switch(), Switch(), Switch()]
    ups = [await RecordingUpstream(s, store_bodies=False).start() for s in switches]
    relays = [await FaultRelay("127.0.0.1", u.port).start() for u in ups]
    config = CONFIG.format(
        a=relays[0].port, b=relays[1].port, c=relays[2].port, read=READ_TIMEOUT,
        interval=INTERVAL, probe=PROBE_TIMEOUT, unhealthy=UNHEALTHY_THRESHOLD,
        c5xx=CONSECUTIVE_5XX,
    )
    keys = [f"127.0.0.1:{r.port}" for r in relays]
    timeline: list[tuple[float, str]] = []
    start = time.monotonic()

    def mark(what: str) -> None:
        timeline.append((time.monotonic() - start, what))

    try:
        async with running_gateway(tmp_path, config) as gw:
            assert gw.plane is not None
            cluster = gw.plane.clusters.clusters["chaos"]
            done = 0
            failures: list[tuple[float, int]] = []
            stop_monitor = asyncio.Event()
            # When each of B and C left and rejoined the available set.
            left: dict[str, float] = {}
            rejoined: dict[str, float] = {}
            fault_at: dict[str, float] = {}
            recover_at = 0.0

            async def monitor() -> None:
                was = {k: True for k in keys}
                while not stop_monitor.is_set():
                    now = time.monotonic()
                    loop_now = asyncio.get_running_loop().time()
                    cluster.has_available(loop_now)  # brings time-driven changes in
                    for key in keys:
                        host = cluster.hosts[key]
                        up = host.health.available(loop_now) and host in cluster.available
                        if up != was[key]:
                            was[key] = up
                            name = "ABC"[keys.index(key)]
                            mark(f"target {name} {'back in' if up else 'out'} "
                                 f"({'healthy' if host.health.active_healthy else 'unhealthy'}, "
                                 f"ejected={host.health.ejected(loop_now)})")
                            if not up and key in fault_at and key not in left:
                                left[key] = now
                            elif up and key in left and recover_at and key not in rejoined:
                                rejoined[key] = now
                    await asyncio.sleep(0.01)  # a sampling period, not a wait for a result

            async def client() -> None:
                nonlocal done, recover_at
                reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
                try:
                    while done < TOTAL:
                        done += 1
                        n = done
                        if n == FAULT_500_AT:
                            switches[1].failing = True
                            fault_at[keys[1]] = time.monotonic()
                            mark("target B starts answering 500")
                        elif n == BLACKHOLE_AT:
                            relays[2].blackhole()
                            fault_at[keys[2]] = time.monotonic()
                            mark("target C blackholed")
                        elif n == RECOVER_AT:
                            switches[1].failing = False
                            relays[2].passthrough()
                            recover_at = time.monotonic()
                            mark("targets B and C recover")
                        status = await _get(reader, writer, b"/item/%d" % n)
                        if status != 200:
                            failures.append((time.monotonic() - start, status))
                finally:
                    writer.close()

            monitor_task = asyncio.create_task(monitor())
            mark(f"load starts: {TOTAL} GETs over {CONCURRENCY} connections")
            await asyncio.wait_for(
                asyncio.gather(*(client() for _ in range(CONCURRENCY))), timeout=240
            )
            mark("load done")
            # The recovered targets may rejoin after the last request: wait for it.
            deadline = time.monotonic() + 5
            while len(rejoined) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            stop_monitor.set()
            await monitor_task
            stats = gw.plane.clusters.stats
            retries = sum(n for (svc, _), n in stats.retries.items() if svc == "chaos")
            ejections = sum(n for (svc, _), n in stats.ejections.items() if svc == "chaos")
    finally:
        for relay in relays:
            await relay.stop()
        for up in ups:
            await up.stop()

    print("\nchaos timeline (seconds since start):")
    for at, what in timeline:
        print(f"  {at:7.3f}  {what}")
    print(f"  served: A={switches[0].served} B={switches[1].served} C={switches[2].served}; "
          f"B answered 500 {switches[1].failed} times; retries {retries}; ejections {ejections}")

    assert failures == [], f"{len(failures)} client requests failed: {failures[:10]}"
    # Each broken target left within what its thresholds allow: the active check
    # alone takes unhealthy_threshold intervals (plus a probe timeout); passive
    # detection is faster. Generous slack for a loaded 2-core machine.
    bound = UNHEALTHY_THRESHOLD * INTERVAL + PROBE_TIMEOUT + READ_TIMEOUT + 0.5
    for key in keys[1:]:
        assert key in left, f"{key} was never taken out"
        assert left[key] - fault_at[key] <= bound, (key, left[key] - fault_at[key])
    # ...and came back within one health interval of recovering (plus the probe's
    # own time and the monitor's sampling).
    for key in keys[1:]:
        assert key in rejoined, f"{key} never came back"
        assert rejoined[key] - recover_at <= INTERVAL + PROBE_TIMEOUT + 0.15, (
            key, rejoined[key] - recover_at,
        )
    assert switches[0].served + switches[1].served + switches[2].served == TOTAL
