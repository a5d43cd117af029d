"""Health checks, circuit breakers, outlier ejection and balancers, through a running
gateway with real upstreams on loopback, and the admin view of that live state.

What a user sees is asserted: statuses and envelope codes, Retry-After, which target
received what, GET /upstreams on the admin port and /metrics. The timeouts have
their own file (test_upstream_timeouts.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.gateway import running_gateway
from support.upstream import Received, RecordingUpstream, Reply
from tollway.gateway.app import Gateway

# Sub-second bounds: a full collection of a late-run heap must not stall them.
pytestmark = pytest.mark.usefixtures("frozen_heap")

TOKEN = "upstream-health-breakers-token-5c1e"
AUTH = {"authorization": f"Bearer {TOKEN}"}


class Backend:
    """A target: answers `status` with its name (after `hold` seconds) to requests,
    `health_status` to GET /health; once `dead`, resets whatever still reaches it."""

    def __init__(self, name: str, status: int = 200, hold: float = 0.0) -> None:
        self.name = name
        self.status = status
        self.health_status = 200
        self.hold = hold
        self.dead = False
        self.served: list[tuple[float, Received]] = []  # (arrival, request), /health aside
        self.upstream = RecordingUpstream(self._handle)

    async def _handle(self, req: Received, reply: Reply) -> None:
        if self.dead:
            reply.abort()
            return
        await req.complete.wait()
        if req.target == "/health":
            reply.send(self.health_status, body=b"health")
            return
        self.served.append((time.monotonic(), req))
        if self.hold:
            await asyncio.sleep(self.hold)  # the target's pace, not a wait for a result
        reply.send(self.status, [("x-backend", self.name)], self.name.encode())

    @property
    def count(self) -> int:
        return len(self.served)

    @property
    def key(self) -> str:
        return f"127.0.0.1:{self.upstream.port}"

    async def start(self) -> Backend:
        await self.upstream.start()
        return self

    async def stop(self) -> None:
        await self.upstream.stop()


@contextlib.asynccontextmanager
async def backends(*specs: Backend) -> AsyncIterator[tuple[Backend, ...]]:
    try:
        for b in specs:
            await b.start()
        yield specs
    finally:
        for b in specs:
            await b.stop()


@dataclass
class Running:
    gw: Gateway
    client: httpx.AsyncClient  # the data plane
    admin: httpx.AsyncClient  # the admin port, with the token

    async def upstream(self, service: str) -> dict[str, Any]:
        r = await self.admin.get(f"/upstreams/{service}")
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def target(self, service: str, key: str) -> dict[str, Any]:
        state = await self.upstream(service)
        (found,) = [t for t in state["targets"] if t["target"] == key]
        return dict(found)


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path, config: str) -> AsyncIterator[Running]:
    async with (
        running_gateway(tmp_path, config, admin_token=TOKEN) as gw,
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=5) as client,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.admin_port}", headers=AUTH, timeout=5
        ) as admin,
    ):
        yield Running(gw, client, admin)


def service_yaml(name: str, targets: list[Backend] | list[tuple[Backend, int]], body: str) -> str:
    entries = []
    for t in targets:
        backend, weight = t if isinstance(t, tuple) else (t, 100)
        entries.append(f'      - {{target: "{backend.key}", weight: {weight}}}')
    lines = "\n".join(entries)
    indented = "\n".join(f"    {line}" for line in body.strip().splitlines())
    return f"""
services:
  - name: {name}
    targets:
{lines}
{indented}
routes:
  - name: {name}
    service: {name}
    paths: [/api]
"""


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["responseStatus"] == "error"
    assert body["error"]["code"] == code, body
    assert body["requestId"]
    return body


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Poll an async condition (every 10 ms) until it holds; the seconds it took."""
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not await check():
            await asyncio.sleep(0.01)
    return time.monotonic() - start


# ---- active health checks: no_healthy_upstream ------------------------------------------


CHECKED = """
read_timeout: 2s
healthchecks:
  active: {path: /health, interval: 0.1s, timeout: 0.1s,
           healthy_threshold: 1, unhealthy_threshold: 1}
"""


async def wait_all_unhealthy(gw: Running, service: str) -> None:
    async def all_unhealthy() -> bool:
        state = await gw.upstream(service)
        # "503", not a timeout of the very first probe (the loop is busy at startup).
        return all(
            not t["health"]["active_healthy"] and t["health"]["last_check"] == "503"
            for t in state["targets"]
        )

    await until(all_unhealthy)
    for t in (await gw.upstream(service))["targets"]:
        assert t["available"] is False


async def first_success(gw: Running, within: float) -> tuple[float, Counter[str]]:
    """Send requests until one is answered 200 (or `within` seconds passed): the
    seconds it took, and the error codes of the refused ones."""
    start = time.monotonic()
    refused: Counter[str] = Counter()
    while time.monotonic() - start < within:
        r = await gw.client.get("/api/x")
        if r.status_code == 200:
            return time.monotonic() - start, refused
        assert r.status_code == 503, r.text
        refused[r.json()["error"]["code"]] += 1
    raise AssertionError(f"no 200 within {within} s; refused: {dict(refused)}")


async def test_unhealthy_targets_refuse_at_once_and_recover_within_an_interval(
    tmp_path: Path,
) -> None:
    a, b = Backend("a"), Backend("b")
    a.health_status = b.health_status = 503
    async with (
        backends(a, b),
        gateway(tmp_path, service_yaml("checked", [a, b], CHECKED)) as gw,
    ):
        await wait_all_unhealthy(gw, "checked")
        # Fewer refusals than the service breaker's default failure_threshold (5):
        # see the next test for what more of them do.
        for _ in range(3):
            start = time.monotonic()
            r = await gw.client.get("/api/x")
            elapsed = time.monotonic() - start
            body = assert_envelope(r, 503, "no_healthy_upstream")
            assert body["error"]["details"] == {"service": "checked"}
            assert elapsed < 1.0, elapsed  # refused, not after read_timeout (2 s)
        assert a.count == b.count == 0  # no request reached a target

        a.health_status = b.health_status = 200
        took, refused = await first_success(gw, within=2.0)
        # One interval (0.1 s) plus the probe's own time and scheduling slack.
        assert took < 0.8, took
        assert set(refused) <= {"no_healthy_upstream"}
        assert a.count + b.count == 1
        for _ in range(4):
            assert (await gw.client.get("/api/x")).status_code == 200
        assert a.count >= 1 and b.count >= 1  # both are back in the balancer


async def test_refusals_while_unhealthy_do_not_delay_the_recovery(tmp_path: Path) -> None:
    """no_healthy_upstream is the gateway's answer, not the service's: refusing more
    requests than the service breaker's failure_threshold must not open it (which
    would refuse circuit_open for open_time after the targets recovered)."""
    a, b = Backend("a"), Backend("b")
    a.health_status = b.health_status = 503
    async with (
        backends(a, b),
        gateway(tmp_path, service_yaml("checked2", [a, b], CHECKED)) as gw,
    ):
        await wait_all_unhealthy(gw, "checked2")
        for _ in range(6):  # above the default failure_threshold of 5
            assert_envelope(await gw.client.get("/api/x"), 503, "no_healthy_upstream")
        assert a.count == b.count == 0  # no upstream ever failed anything

        a.health_status = b.health_status = 200
        took, refused = await first_success(gw, within=1.0)
        assert took < 0.8, took
        assert set(refused) <= {"no_healthy_upstream"}, refused


# ---- the circuit breaker ----------------------------------------------------------------


def breaker_transitions(metrics: str, service: str) -> dict[tuple[str, str], float]:
    """(target, state) -> count of tollway_upstream_breaker_transitions_total."""
    out: dict[tuple[str, str], float] = {}
    for line in metrics.splitlines():
        if not line.startswith("tollway_upstream_breaker_transitions_total{"):
            continue
        labels_part, _, value = line.rpartition(" ")
        labels = dict(
            item.split("=", 1) for item in labels_part[labels_part.index("{") + 1 : -1].split(",")
        )
        labels = {k: v.strip('"') for k, v in labels.items()}
        if labels.get("service") == service:
            out[labels["target"], labels["state"]] = float(value)
    return out


async def test_circuit_opens_fails_fast_then_half_opens_and_closes(tmp_path: Path) -> None:
    target = Backend("t", status=503)
    async with backends(target):
        config = service_yaml("brk", [target], """
retries: {attempts: 1}
circuit_breaker: {failure_threshold: 3, open_time: 0.5s, failure_rate: null,
                  half_open_successes: 2}
""")
        async with gateway(tmp_path, config) as gw:
            state = await gw.upstream("brk")
            assert state["circuit"]["state"] == "closed"
            assert state["targets"][0]["circuit"]["state"] == "closed"
            for _ in range(3):
                r = await gw.client.get("/api/x")
                assert r.status_code == 503
                assert r.text == "t"  # the target's own answer, passed through
            opened = time.monotonic()
            assert target.count == 3

            r = await gw.client.get("/api/x")
            body = assert_envelope(r, 503, "circuit_open")
            assert body["error"]["details"] == {"service": "brk"}
            # The rest of the open time, in whole seconds and at least 1.
            assert r.headers.get("retry-after") == "1"
            assert target.count == 3  # failed fast: the target saw nothing
            assert time.monotonic() - opened < 0.5, "too slow to see the open circuit"
            state = await gw.upstream("brk")
            assert state["circuit"]["state"] == "open"
            assert state["targets"][0]["circuit"]["state"] == "open"
            assert state["targets"][0]["available"] is False

            # The target recovers; after open_time a probe goes through (half-open).
            target.status = 200
            _, refused = await first_success(gw, within=3.0)
            assert set(refused) == {"circuit_open"}, refused
            # (`opened` was taken just after the breaker opened, hence 0.45.)
            assert time.monotonic() - opened >= 0.45
            assert target.count == 4
            state = await gw.upstream("brk")
            assert state["circuit"]["state"] == "half_open"  # one success of two
            r = await gw.client.get("/api/x")
            assert r.status_code == 200
            state = await gw.upstream("brk")
            assert state["circuit"]["state"] == "closed"
            assert state["targets"][0]["circuit"]["state"] == "closed"
            assert state["targets"][0]["circuit"]["opened_times"] == 1

            want = {
                (t, s) for t in ("", target.key) for s in ("open", "half_open", "closed")
            }

            async def counted() -> bool:
                r = await gw.admin.get("/metrics")
                seen = breaker_transitions(r.text, "brk")
                return all(seen.get(k, 0) >= 1 for k in want)

            await until(counted, timeout=3)


# ---- passive health: outlier ejection ---------------------------------------------------


async def test_a_failing_target_is_ejected_and_comes_back_after_the_ejection_time(
    tmp_path: Path,
) -> None:
    good, bad = Backend("good"), Backend("bad", status=500)
    async with backends(good, bad):
        config = service_yaml("ej", [good, bad], """
balancer: round_robin
healthchecks:
  passive: {consecutive_5xx: 2, consecutive_failures: 2, base_ejection_time: 0.5s,
            max_ejection_time: 5s}
retries: {attempts: 2, on_statuses: [500], backoff_base: 1ms, backoff_max: 2ms}
""")
        async with gateway(tmp_path, config) as gw:
            statuses: Counter[int] = Counter()
            async with asyncio.timeout(5):
                while bad.count < 2:
                    statuses[(await gw.client.get("/api/x")).status_code] += 1
            ejected_at = bad.served[1][0]
            info = await gw.target("ej", bad.key)
            assert info["available"] is False
            assert info["health"]["ejected"] is True
            assert info["health"]["ejections"] == 1
            assert (await gw.target("ej", good.key))["available"] is True

            # Ejected: everything goes to the good target until the time is up.
            async with asyncio.timeout(5):
                while bad.count == 2:
                    statuses[(await gw.client.get("/api/x")).status_code] += 1
            back_after = bad.served[2][0] - ejected_at
            assert 0.5 <= back_after < 1.0, back_after
            assert statuses == {200: statuses.total()}  # no client saw the 500s
            assert good.count == statuses.total()


# ---- balancers ---------------------------------------------------------------------------


async def test_least_connections_prefers_the_idle_target(tmp_path: Path) -> None:
    """20 concurrent clients, 5 requests each: the slow target holds each request 0.3 s,
    so it is the busier one whenever a request is picked, and the fast one serves most.

    (All 20 sent in the same instant split 10/10: when they are picked none has ended
    yet, so both targets are equally busy. That is least_connections working.)
    """
    slow, fast = Backend("slow", hold=0.3), Backend("fast")
    async with backends(slow, fast):
        config = service_yaml("lc", [slow, fast], "balancer: least_connections")
        async with gateway(tmp_path, config) as gw:
            served: Counter[str] = Counter()

            async def client() -> None:
                for _ in range(5):
                    r = await gw.client.get("/api/x")
                    assert r.status_code == 200
                    served[r.text] += 1

            await asyncio.gather(*(client() for _ in range(20)))
            assert served.total() == 100
            assert served["fast"] >= 70, served  # round robin would give 50


async def test_weighted_round_robin_splits_by_weight(tmp_path: Path) -> None:
    heavy, light = Backend("heavy"), Backend("light")
    async with backends(heavy, light):
        config = service_yaml("wrr", [(heavy, 300), (light, 100)], "balancer: weighted_round_robin")
        async with gateway(tmp_path, config) as gw:
            served: Counter[str] = Counter()

            async def client() -> None:
                for _ in range(50):
                    r = await gw.client.get("/api/x")
                    assert r.status_code == 200
                    served[r.text] += 1

            await asyncio.gather(*(client() for _ in range(8)))
            assert served.total() == 400
            assert abs(served["heavy"] - 300) <= 8, served  # within 2 %
            assert heavy.count + light.count == 400


async def test_consistent_hash_keeps_users_and_moves_only_the_stopped_targets(
    tmp_path: Path,
) -> None:
    targets = (Backend("a"), Backend("b"), Backend("c"))
    users = [f"user-{i}" for i in range(60)]
    async with backends(*targets):
        config = service_yaml(
            "ch", list(targets), "balancer: consistent_hash\nhash_on: header:X-User"
        )
        async with gateway(tmp_path, config) as gw:

            async def where(user: str) -> str:
                r = await gw.client.get("/api/x", headers={"X-User": user})
                assert r.status_code == 200, r.text
                return r.text

            before: dict[str, str] = {}
            for _ in range(3):
                for user in users:
                    got = await where(user)
                    assert before.setdefault(user, got) == got, user  # always the same one
            assert set(before.values()) == {"a", "b", "c"}

            stopped = targets[1]
            stopped.dead = True  # connections still open are reset
            await stopped.stop()  # and new ones refused
            after: dict[str, str] = {}
            for _ in range(2):
                for user in users:
                    got = await where(user)
                    assert after.setdefault(user, got) == got, user
            for user in users:
                if before[user] == stopped.name:
                    assert after[user] != stopped.name
                else:
                    assert after[user] == before[user], user  # only b's users moved
            info = await gw.target("ch", stopped.key)
            assert info["available"] is False


# ---- the admin view ---------------------------------------------------------------------


async def test_admin_lists_services_targets_health_and_circuits(tmp_path: Path) -> None:
    a, b = Backend("a"), Backend("b")
    async with backends(a, b):
        config = service_yaml("shown", [a, b], """
balancer: round_robin
healthchecks:
  active: {path: /health, interval: 0.1s, timeout: 0.1s}
""")
        async with gateway(tmp_path, config) as gw:
            r = await gw.admin.get("/upstreams", headers={"authorization": ""})
            assert r.status_code == 401

            async def checked() -> bool:
                state = await gw.upstream("shown")
                return all(t["health"]["last_check"] == "200" for t in state["targets"])

            await until(checked)
            for _ in range(2):
                assert (await gw.client.get("/api/x")).status_code == 200
            r = await gw.admin.get("/upstreams")
            assert r.status_code == 200
            data = r.json()["data"]
            assert set(data) == {"shown"}
            shown = data["shown"]
            assert shown["balancer"] == "round_robin"
            assert shown["circuit"]["state"] == "closed"
            assert {t["target"] for t in shown["targets"]} == {a.key, b.key}
            for t in shown["targets"]:
                assert t["sources"] == ["config"]
                assert t["available"] is True
                assert t["weight"] == 100
                assert t["health"]["healthy"] is True
                assert t["health"]["last_check_ok"] is True
                assert t["circuit"]["state"] == "closed"

            r = await gw.admin.get("/upstreams/nope")
            assert_envelope(r, 404, "service_not_found")

            r = await gw.admin.get("/health/detailed")
            assert r.status_code == 200
            clusters = r.json()["checks"]["upstreams"]["details"]["clusters"]
            assert set(clusters) == {"shown"}
            assert {t["target"] for t in clusters["shown"]["targets"]} == {a.key, b.key}


async def test_admin_availability_is_live_without_traffic(tmp_path: Path) -> None:
    """`available` is what the balancer would do now, even when no request came to
    refresh its set: before the first request, and once the circuit opened."""
    target = Backend("t", status=503)
    async with backends(target):
        config = service_yaml("live", [target], """
retries: {attempts: 1}
circuit_breaker: {failure_threshold: 2, open_time: 5s, failure_rate: null}
""")
        async with gateway(tmp_path, config) as gw:
            # Healthy, circuit closed, no request yet: it takes traffic.
            info = await gw.target("live", target.key)
            assert info["health"]["healthy"] is True
            assert info["circuit"]["state"] == "closed"
            assert info["available"] is True
            for _ in range(2):
                assert (await gw.client.get("/api/x")).status_code == 503
            # Its circuit is open: it takes none (the service breaker refuses before
            # any pick, so nothing else refreshes the cache).
            assert_envelope(await gw.client.get("/api/x"), 503, "circuit_open")
            info = await gw.target("live", target.key)
            assert info["circuit"]["state"] == "open"
            assert info["available"] is False
