"""Discovery and shared circuits through a running gateway with real upstreams.

- admin registrations: a `registration: true` service gains, shares, loses and
  expires targets through POST/DELETE /upstreams/{service}/targets, without a reload;
- DNS: a dnslib stub on 127.0.0.1 whose records the test changes (A and SRV);
- the environment: TOLLWAY_SERVICE_<NAME>_URL over the file's url;
- circuits opened on one gateway reach another through the real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from dnslib import QTYPE, RCODE, RR, DNSRecord
from dnslib.server import DNSLogger, DNSServer

from support.gateway import running_gateway
from support.redis_server import SHARED_REDIS_URL, drop_keys, shared_client
from support.upstream import Received, RecordingUpstream, Reply
from tollway.config.errors import ConfigError
from tollway.gateway.app import Gateway
from tollway.upstream.circuit import BreakerState

# Sub-second bounds: a full collection of a late-run heap must not stall them.
pytestmark = pytest.mark.usefixtures("frozen_heap")

TOKEN = "discovery-admin-token-3b9e41"
AUTH = {"authorization": f"Bearer {TOKEN}"}
# The registration watcher polls each second: a change reaches traffic within ~2 s.
REGISTRATION_WAIT = 4.0


# ---- helpers -----------------------------------------------------------------------


def named(name: str, status: int = 200) -> Callable[[Received, Reply], Awaitable[None]]:
    """A handler answering `status` with the upstream's name as the body."""

    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.send(status, [("content-type", "text/plain")], name.encode())

    return handler


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["responseStatus"] == "error", body
    assert body["error"]["code"] == code, body
    assert body["requestId"]
    return body


async def until(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str
) -> float:
    """Poll an async condition until it holds; the seconds it took."""
    start = time.monotonic()
    deadline = start + timeout
    while not await check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        await asyncio.sleep(0.02)  # polling period of a condition with a deadline
    return time.monotonic() - start


@contextlib.asynccontextmanager
async def clients(gw: Gateway) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """(proxy client, admin client with the token)."""
    async with (
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}", timeout=5) as proxy,
        httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.admin_port}", headers=AUTH, timeout=5
        ) as admin,
    ):
        yield proxy, admin


async def targets_of(admin: httpx.AsyncClient, service: str) -> dict[str, list[str]]:
    """target -> its sources, as GET /upstreams/{service} shows them."""
    r = await admin.get(f"/upstreams/{service}")
    assert r.status_code == 200, r.text
    return {t["target"]: t["sources"] for t in r.json()["targets"]}


# ---- registrations -----------------------------------------------------------------

REGISTRATION_CONFIG = """
services:
  - name: reg
    registration: true
    connect_timeout: 0.3s
    read_timeout: 0.5s
    balancer: round_robin
  - name: static
    url: http://127.0.0.1:9
routes:
  - name: reg
    service: reg
    paths: [/api]
  - name: static
    service: static
    paths: [/static]
"""


async def test_registered_targets_take_share_and_leave_traffic(tmp_path: Path) -> None:
    async with (
        RecordingUpstream(named("one")) as one,
        RecordingUpstream(named("two")) as two,
        running_gateway(tmp_path, REGISTRATION_CONFIG, admin_token=TOKEN) as gw,
        clients(gw) as (proxy, admin),
    ):
        key1, key2 = f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"
        # Nothing registered yet: no target at all.
        body = assert_envelope(await proxy.get("/api/x"), 503, "no_healthy_upstream")
        assert body["error"]["details"] == {"service": "reg"}

        r = await admin.post("/upstreams/reg/targets", json={"target": key1})
        assert r.status_code == 201, r.text

        # Polled on the admin side (the proxy side is the next test's).
        async def one_listed() -> bool:
            return key1 in await targets_of(admin, "reg")

        took = await until(one_listed, REGISTRATION_WAIT, "the registered target arrives")
        assert took < 3.0, took
        assert await targets_of(admin, "reg") == {key1: ["registration"]}
        r = await proxy.get("/api/x")
        assert (r.status_code, r.text) == (200, "one")
        assert one.requests[-1].target == "/x"  # strip_path

        # A second registration shares the traffic (round robin: half each).
        r = await admin.post("/upstreams/reg/targets", json={"target": key2})
        assert r.status_code == 201, r.text

        async def two_listed() -> bool:
            return key2 in await targets_of(admin, "reg")

        await until(two_listed, REGISTRATION_WAIT, "the second target is in the cluster")
        served = [(await proxy.get(f"/api/{i}")).text for i in range(10)]
        assert sorted(served) == ["one"] * 5 + ["two"] * 5, served
        assert await targets_of(admin, "reg") == {
            key1: ["registration"], key2: ["registration"],
        }

        # Deregistered: its traffic stops.
        r = await admin.delete(f"/upstreams/reg/targets/{key1}")
        assert r.status_code == 204, r.text

        async def one_gone() -> bool:
            return key1 not in await targets_of(admin, "reg")

        await until(one_gone, REGISTRATION_WAIT, "the deregistered target leaves")
        before = len(one.requests)
        served = [(await proxy.get(f"/api/after/{i}")).text for i in range(10)]
        assert served == ["two"] * 10
        assert len(one.requests) == before
        assert gw.reloads == 0


async def test_requests_before_the_first_registration_do_not_delay_it(
    tmp_path: Path,
) -> None:
    async with (
        RecordingUpstream(named("one")) as one,
        running_gateway(tmp_path, REGISTRATION_CONFIG, admin_token=TOKEN) as gw,
        clients(gw) as (proxy, admin),
    ):
        # A client keeps calling while the service has no target yet (the default
        # failure_threshold is 5).
        for _ in range(5):
            assert_envelope(await proxy.get("/api/x"), 503, "no_healthy_upstream")
        r = await admin.post("/upstreams/reg/targets", json={"target": f"127.0.0.1:{one.port}"})
        assert r.status_code == 201, r.text
        # Within the watcher's poll (each second) plus slack; the default open_time
        # is 5 s.
        codes: list[str] = []
        deadline = time.monotonic() + 2.5
        while True:
            r = await proxy.get("/api/x")
            if (r.status_code, r.text) == (200, "one"):
                break
            codes.append(r.json()["error"]["code"])
            assert time.monotonic() < deadline, f"still refused: {sorted(set(codes))}"
            await asyncio.sleep(0.05)  # a client's polling period


async def test_an_expired_registration_leaves_and_a_heart_beaten_one_stays(
    tmp_path: Path,
) -> None:
    async with (
        RecordingUpstream(named("one")) as one,
        RecordingUpstream(named("two")) as two,
        running_gateway(tmp_path, REGISTRATION_CONFIG, admin_token=TOKEN) as gw,
        clients(gw) as (proxy, admin),
    ):
        key1, key2 = f"127.0.0.1:{one.port}", f"127.0.0.1:{two.port}"
        for key in (key1, key2):
            r = await admin.post("/upstreams/reg/targets", json={"target": key})
            assert r.status_code == 201, r.text

        async def both_listed() -> bool:
            return (await targets_of(admin, "reg")).keys() == {key1, key2}

        await until(both_listed, REGISTRATION_WAIT, "both registrations reach the cluster")
        # Both now live for one second only; `two` heart-beats, `one` does not.
        for key in (key1, key2):
            r = await admin.post("/upstreams/reg/targets", json={"target": key, "ttl": "1s"})
            assert r.status_code == 200, r.text
        refreshed_at = time.monotonic()
        beats: list[int] = []

        async def heartbeat() -> None:
            while True:
                r = await admin.post(f"/upstreams/reg/targets/{key2}/heartbeat")
                beats.append(r.status_code)
                await asyncio.sleep(0.25)  # the heart-beat period

        beating = asyncio.create_task(heartbeat())
        try:
            async def one_gone() -> bool:
                return key1 not in await targets_of(admin, "reg")

            await until(one_gone, REGISTRATION_WAIT, "the expired registration leaves")
            assert await targets_of(admin, "reg") == {key2: ["registration"]}
            # `two` outlives its one-second TTL several times over while it beats,
            # and takes every request meanwhile.
            before = len(one.requests)
            while time.monotonic() - refreshed_at < 2.5:
                r = await proxy.get("/api/x")
                assert (r.status_code, r.text) == (200, "two")
            assert len(one.requests) == before
            assert beats and set(beats) == {200}, beats
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating

        # No more heart-beats: `two` expires too, and the service has no target.
        async def refused() -> bool:
            r = await proxy.get("/api/x")
            return r.status_code == 503 and r.json()["error"]["code"] == "no_healthy_upstream"

        await until(refused, REGISTRATION_WAIT, "the last registration expires")
        assert await targets_of(admin, "reg") == {}
        r = await admin.post(f"/upstreams/reg/targets/{key2}/heartbeat")
        assert_envelope(r, 404, "target_not_found")


async def test_registration_refused_for_unknown_and_closed_services(tmp_path: Path) -> None:
    async with (
        running_gateway(tmp_path, REGISTRATION_CONFIG, admin_token=TOKEN) as gw,
        clients(gw) as (_proxy, admin),
    ):
        r = await admin.post("/upstreams/nope/targets", json={"target": "127.0.0.1:9"})
        assert_envelope(r, 404, "service_not_found")
        r = await admin.post("/upstreams/static/targets", json={"target": "127.0.0.1:9"})
        body = assert_envelope(r, 409, "registration_disabled")
        assert "registration: true" in body["message"]
        assert_envelope(await admin.get("/upstreams/nope"), 404, "service_not_found")
        # Nothing was registered anywhere.
        r = await admin.get("/upstreams/reg/targets")
        assert r.status_code == 200 and r.json() == {"data": []}
        assert await targets_of(admin, "static") == {"127.0.0.1:9": ["config"]}


# ---- DNS ---------------------------------------------------------------------------


class StubZone:
    """dnslib resolver answering from `records` (name -> zone lines), which tests
    replace; an unknown name is NXDOMAIN."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.port = 0
        self._lock = threading.Lock()

    def set(self, records: dict[str, list[str]]) -> None:
        with self._lock:
            self.records = records

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            records = self.records
        reply = request.reply()
        if qname not in records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for line in records[qname]:
            for rr in RR.fromZone(line):
                if QTYPE[rr.rtype] == qtype:
                    reply.add_answer(rr)
        return reply


@pytest.fixture
def zone() -> Iterator[StubZone]:
    stub = StubZone()
    server = DNSServer(stub, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _l: None))
    stub.port = server.server.server_address[1]
    server.start_thread()
    try:
        yield stub
    finally:
        server.stop()
        server.server.server_close()


def dns_config(zone: StubZone, dns: str) -> str:
    return f"""
services:
  - name: dnsy
    dns: {{{dns}, nameservers: ["127.0.0.1:{zone.port}"], min_ttl: 0.1s}}
    connect_timeout: 0.3s
    read_timeout: 0.5s
routes:
  - name: dnsy
    service: dnsy
    paths: [/api]
"""


async def switch_under_load(
    proxy: httpx.AsyncClient, change: Callable[[], None], two: RecordingUpstream
) -> list[tuple[int, str]]:
    """Requests one after another: `change` after five, until `two` served five."""
    seen: list[tuple[int, str]] = []
    deadline = time.monotonic() + 5
    changed_at: int | None = None
    while True:
        r = await proxy.get(f"/api/{len(seen)}")
        seen.append((r.status_code, r.text))
        if len(seen) == 5:
            change()
            changed_at = len(seen)
        if changed_at is not None and sum(1 for _, who in seen if who == "two") >= 5:
            return seen
        assert time.monotonic() < deadline, f"traffic never moved: {seen[-5:]}"


async def test_dns_a_records_give_the_targets_and_changes_move_traffic(
    tmp_path: Path, zone: StubZone
) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 127.0.0.1"]})
    async with RecordingUpstream(named("one")) as one:
        # The same port on another loopback address: only the A record changes.
        two = await RecordingUpstream(named("two")).start("127.0.0.2", one.port)
        try:
            config = dns_config(zone, f"name: api.test, port: {one.port}")
            async with (
                running_gateway(tmp_path, config, admin_token=TOKEN) as gw,
                clients(gw) as (proxy, admin),
            ):
                async def resolved() -> bool:
                    return bool(await targets_of(admin, "dnsy"))

                await until(resolved, 3.0, "the first resolution")
                r = await proxy.get("/api/x")
                assert (r.status_code, r.text) == (200, "one")
                assert await targets_of(admin, "dnsy") == {f"127.0.0.1:{one.port}": ["dns"]}

                seen = await switch_under_load(
                    proxy, lambda: zone.set({"api.test.": ["api.test. 0 IN A 127.0.0.2"]}), two
                )
                assert all(status == 200 for status, _ in seen), seen
                who = [w for _, w in seen]
                first_two = who.index("two")
                assert set(who[:first_two]) == {"one"} and set(who[first_two:]) == {"two"}, who
                assert await targets_of(admin, "dnsy") == {f"127.0.0.2:{one.port}": ["dns"]}
                assert gw.reloads == 0
        finally:
            await two.stop()


async def test_dns_srv_port_change_moves_traffic_without_a_failed_request(
    tmp_path: Path, zone: StubZone
) -> None:
    def srv(port: int) -> dict[str, list[str]]:
        return {
            "_http._tcp.api.test.": [f"_http._tcp.api.test. 0 IN SRV 10 100 {port} host.api.test."],
            "host.api.test.": ["host.api.test. 0 IN A 127.0.0.1"],
        }

    async with RecordingUpstream(named("one")) as one, RecordingUpstream(named("two")) as two:
        zone.set(srv(one.port))
        config = dns_config(zone, "srv: _http._tcp.api.test")
        async with (
            running_gateway(tmp_path, config, admin_token=TOKEN) as gw,
            clients(gw) as (proxy, admin),
        ):
            async def resolved() -> bool:
                return bool(await targets_of(admin, "dnsy"))

            await until(resolved, 3.0, "the first resolution")
            assert await targets_of(admin, "dnsy") == {f"127.0.0.1:{one.port}": ["dns"]}
            seen = await switch_under_load(proxy, lambda: zone.set(srv(two.port)), two)
            assert all(status == 200 for status, _ in seen), seen
            who = [w for _, w in seen]
            first_two = who.index("two")
            assert set(who[:first_two]) == {"one"} and set(who[first_two:]) == {"two"}, who
            assert await targets_of(admin, "dnsy") == {f"127.0.0.1:{two.port}": ["dns"]}
            assert len(one.requests) == first_two
            assert gw.reloads == 0


# ---- the environment ---------------------------------------------------------------


def env_config(url: str) -> str:
    return f"""
services:
  - name: my-api
    url: {url}
    connect_timeout: 0.3s
    read_timeout: 0.5s
routes:
  - name: api
    service: my-api
    paths: [/api]
"""


async def test_the_environment_url_overrides_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with RecordingUpstream(named("file")) as file_up, RecordingUpstream(
        named("env")
    ) as env_up:
        monkeypatch.setenv("TOLLWAY_SERVICE_MY_API_URL", f"{env_up.url}/from-env")
        config = env_config(f"{file_up.url}/from-file")
        async with (
            running_gateway(tmp_path, config, admin_token=TOKEN) as gw,
            clients(gw) as (proxy, admin),
        ):
            for i in range(3):
                r = await proxy.get(f"/api/{i}")
                assert (r.status_code, r.text) == (200, "env")
            assert file_up.requests == []
            assert [q.target for q in env_up.requests] == [f"/from-env/{i}" for i in range(3)]
            assert await targets_of(admin, "my-api") == {f"127.0.0.1:{env_up.port}": ["config"]}


async def test_a_bad_environment_url_stops_the_gateway_from_starting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLWAY_SERVICE_MY_API_URL", "127.0.0.1:8080,127.0.0.1:http")
    with pytest.raises(ConfigError) as caught:
        async with running_gateway(tmp_path, env_config("http://127.0.0.1:9"), admin_token=TOKEN):
            pytest.fail("the gateway started")
    message = str(caught.value)
    assert "TOLLWAY_SERVICE_MY_API_URL" in message, message
    assert "entry 2" in message, message


# ---- circuits shared through Redis -------------------------------------------------


@pytest.mark.needs_redis
async def test_a_circuit_opened_on_one_gateway_is_open_on_the_other(tmp_path: Path) -> None:
    client = await shared_client()  # skips without Redis
    service = f"shared-{uuid.uuid4().hex[:12]}"
    calls = 0

    async def failing(req: Received, reply: Reply) -> None:
        nonlocal calls
        calls += 1
        await req.complete.wait()
        reply.send(503, [("content-type", "text/plain")], b"down")

    try:
        async with RecordingUpstream(failing) as up:
            config = f"""
services:
  - name: {service}
    url: {up.url}
    connect_timeout: 0.3s
    read_timeout: 0.5s
    retries: {{attempts: 1}}
    circuit_breaker: {{failure_threshold: 2, open_time: 2s}}
routes:
  - name: api
    service: {service}
    paths: [/api]
"""
            dirs = [tmp_path / "gw1", tmp_path / "gw2"]
            for d in dirs:
                d.mkdir()
            key = f"127.0.0.1:{up.port}"
            async with (
                running_gateway(dirs[0], config, redis_url=SHARED_REDIS_URL) as gw1,
                running_gateway(dirs[1], config, redis_url=SHARED_REDIS_URL) as gw2,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw1.port}", timeout=5) as c1,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw2.port}", timeout=5) as c2,
            ):
                assert gw1.plane is not None and gw2.plane is not None
                # Two failures on gateway 1 open its circuit.
                for _ in range(2):
                    r = await c1.get("/api/x")
                    assert (r.status_code, r.text) == (503, "down")
                r = await c1.get("/api/x")
                assert_envelope(r, 503, "circuit_open")
                assert int(r.headers["retry-after"]) >= 1
                assert calls == 2

                cluster2 = gw2.plane.clusters.clusters[service]

                async def open_on_two() -> bool:
                    now = asyncio.get_running_loop().time()
                    return cluster2.hosts[key].breaker.state(now) is BreakerState.OPEN

                await until(open_on_two, 3.0, "gateway 2 learns the open circuit")
                # Gateway 2 never sent anything, yet refuses without calling the upstream.
                r = await c2.get("/api/x")
                assert_envelope(r, 503, "circuit_open")
                assert int(r.headers["retry-after"]) >= 1
                assert calls == 2
                assert len(up.requests) == 2
    finally:
        await drop_keys(client, f"tollway:circuit:{service}")
        await client.aclose()
