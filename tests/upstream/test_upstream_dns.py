"""DnsWatcher against a real DNS server on 127.0.0.1 (dnslib), whose records the test
changes: A/AAAA union, SRV priorities/weights/ports, re-resolution on TTL, outages
that keep the last known targets, NXDOMAIN that empties them."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, DNSError, DNSRecord
from dnslib.server import DNSLogger, DNSServer
from structlog.testing import capture_logs

from tollway.config.upstream_schema import DnsDiscovery
from tollway.upstream.dns_watcher import DnsWatcher
from tollway.upstream.service import Target


class StubZone:
    """A resolver for dnslib's server: answers from `records`, which tests replace.

    `records` maps a lower-case name ("api.test.") to zone lines; a name that is not
    there is NXDOMAIN. `additional` maps a name to lines sent in the additional
    section of answers for it. `mode` "servfail" answers SERVFAIL, "drop" nothing.
    """

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.additional: dict[str, list[str]] = {}
        self.mode = "answer"
        self.queries: list[tuple[str, str]] = []
        self.port = 0
        self._lock = threading.Lock()

    def set(self, records: dict[str, list[str]], additional: dict[str, list[str]] | None = None
            ) -> None:
        with self._lock:
            self.records = records
            self.additional = additional or {}

    def resolve(self, request: DNSRecord, handler: Any) -> DNSRecord:
        qname = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            self.queries.append((qname, qtype))
            records, additional, mode = self.records, self.additional, self.mode
        if mode == "drop":
            raise DNSError("dropped on purpose")  # the handler sends nothing
        reply = request.reply()
        if mode == "servfail":
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        if qname not in records:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for line in records[qname]:
            for rr in RR.fromZone(line):
                if QTYPE[rr.rtype] == qtype:
                    reply.add_answer(rr)
        for line in additional.get(qname, []):
            for rr in RR.fromZone(line):
                reply.add_ar(rr)
        return reply

    def count(self, qname: str) -> int:
        with self._lock:
            return sum(1 for name, _ in self.queries if name == qname)


@pytest.fixture
def stub() -> Iterator[tuple[StubZone, DNSServer]]:
    zone = StubZone()
    server = DNSServer(
        zone, address="127.0.0.1", port=0, logger=DNSLogger(logf=lambda _line: None)
    )
    zone.port = server.server.server_address[1]
    server.start_thread()
    try:
        yield zone, server
    finally:
        server.stop()
        server.server.server_close()


@pytest.fixture
def zone(stub: tuple[StubZone, DNSServer]) -> StubZone:
    return stub[0]


def config(zone: StubZone, **fields: Any) -> DnsDiscovery:
    return DnsDiscovery(nameservers=(f"127.0.0.1:{zone.port}",), **fields)


class Changes:
    """Records on_change calls; `wait(n)` waits for the n-th one (with a timeout)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Target, ...]]] = []
        self._changed = asyncio.Event()

    def __call__(self, service: str, targets: tuple[Target, ...]) -> None:
        self.calls.append((service, targets))
        self._changed.set()

    async def wait(self, n: int, timeout: float = 5.0) -> tuple[Target, ...]:
        async with asyncio.timeout(timeout):
            while len(self.calls) < n:
                self._changed.clear()
                await self._changed.wait()
        return self.calls[n - 1][1]


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def watchers() -> AsyncIterator[list[DnsWatcher]]:
    started: list[DnsWatcher] = []
    yield started
    for w in started:
        await w.aclose()


def start(watchers: list[DnsWatcher], w: DnsWatcher) -> DnsWatcher:
    watchers.append(w)
    w.start()
    return w


# -- one resolution ---------------------------------------------------------------


async def test_a_and_aaaa_records_are_joined_sorted_on_the_configured_port(
    zone: StubZone,
) -> None:
    zone.set({
        "api.test.": [
            "api.test. 60 IN A 10.0.0.2",
            "api.test. 60 IN A 10.0.0.1",
            "api.test. 30 IN AAAA 2001:db8::1",
        ]
    })
    w = DnsWatcher("api", config(zone, name="api.test", port=8080, weight=7), Changes())
    targets, ttl = await w.resolve()
    assert targets == (
        Target("10.0.0.1", 8080, 7),
        Target("10.0.0.2", 8080, 7),
        Target("2001:db8::1", 8080, 7),
    )
    assert targets[2].authority == b"[2001:db8::1]:8080"
    assert ttl == 30  # the smallest record TTL
    assert ("api.test.", "A") in zone.queries and ("api.test.", "AAAA") in zone.queries


async def test_a_name_with_only_a_records_resolves(zone: StubZone) -> None:
    zone.set({"v4.test.": ["v4.test. 120 IN A 192.0.2.9"]})
    w = DnsWatcher("v4", config(zone, name="v4.test", port=80), Changes())
    targets, ttl = await w.resolve()
    assert targets == (Target("192.0.2.9", 80, 100),)
    # The empty AAAA answer carries no SOA here: dnspython's negative TTL (300)
    # is above the record's, so the record's TTL wins.
    assert ttl == 120


async def test_srv_uses_the_lowest_priority_with_its_weights_and_ports(
    zone: StubZone,
) -> None:
    zone.set(
        {
            "_api._tcp.test.": [
                "_api._tcp.test. 40 IN SRV 10 5 8001 a.test.",
                "_api._tcp.test. 40 IN SRV 10 0 8002 b.test.",
                "_api._tcp.test. 40 IN SRV 20 100 9000 c.test.",
            ],
            "a.test.": ["a.test. 50 IN A 10.0.1.1"],
            "b.test.": ["b.test. 25 IN A 10.0.1.2", "b.test. 25 IN AAAA 2001:db8::2"],
            "c.test.": ["c.test. 50 IN A 10.0.1.3"],
        },
        # The server hands a.test's address along with the SRV answer.
        additional={"_api._tcp.test.": ["a.test. 35 IN A 10.0.1.1"]},
    )
    w = DnsWatcher("api", config(zone, srv="_api._tcp.test"), Changes())
    targets, ttl = await w.resolve()
    assert targets == (
        Target("10.0.1.1", 8001, 5),
        Target("10.0.1.2", 8002, 1),  # SRV weight 0 -> 1: still picked, rarely
        Target("2001:db8::2", 8002, 1),
    )
    assert ttl == 25
    # a.test came from the additional section; c.test (priority 20) is a fallback.
    assert zone.count("a.test.") == 0
    assert zone.count("b.test.") == 2
    assert zone.count("c.test.") == 0


async def test_srv_with_the_root_target_means_no_targets(zone: StubZone) -> None:
    zone.set({"_x._tcp.test.": ["_x._tcp.test. 60 IN SRV 0 0 0 ."]})
    w = DnsWatcher("x", config(zone, srv="_x._tcp.test"), Changes())
    assert (await w.resolve())[0] == ()


async def test_nxdomain_and_empty_answers_are_no_targets(zone: StubZone) -> None:
    zone.set({"mail.test.": ["mail.test. 60 IN MX 10 mx.test."]})
    missing = DnsWatcher("m", config(zone, name="missing.test", port=80), Changes())
    assert (await missing.resolve())[0] == ()
    no_address = DnsWatcher("n", config(zone, name="mail.test", port=80), Changes())
    assert (await no_address.resolve())[0] == ()
    no_srv = DnsWatcher("s", config(zone, srv="_none._tcp.test"), Changes())
    assert (await no_srv.resolve())[0] == ()


def test_a_nameserver_must_be_an_address() -> None:
    with pytest.raises(ValueError, match="IP address"):
        DnsWatcher(
            "api",
            DnsDiscovery(name="api.test", port=80, nameservers=("dns.example:53",)),
            Changes(),
        )


# -- the watcher ------------------------------------------------------------------


async def test_a_changed_record_set_is_picked_up_after_the_ttl(
    zone: StubZone, watchers: list[DnsWatcher]
) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    w = start(
        watchers,
        DnsWatcher("api", config(zone, name="api.test", port=81, min_ttl=0.1), changes),
    )
    assert await changes.wait(1) == (Target("10.0.0.1", 81),)
    assert changes.calls[0][0] == "api"
    # The same set again, several times over: no call.
    seen = zone.count("api.test.")
    await eventually(lambda: zone.count("api.test.") >= seen + 6)
    assert len(changes.calls) == 1

    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.2", "api.test. 0 IN A 10.0.0.1"]})
    assert await changes.wait(2) == (Target("10.0.0.1", 81), Target("10.0.0.2", 81))
    assert w.targets == (Target("10.0.0.1", 81), Target("10.0.0.2", 81))


async def test_the_first_answer_is_reported_even_when_empty(
    zone: StubZone, watchers: list[DnsWatcher]
) -> None:
    changes = Changes()
    start(watchers, DnsWatcher("api", config(zone, name="gone.test", port=80), changes))
    assert await changes.wait(1) == ()


async def test_nxdomain_empties_the_targets(
    zone: StubZone, watchers: list[DnsWatcher]
) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    w = start(
        watchers,
        DnsWatcher(
            "api", config(zone, name="api.test", port=80, min_ttl=0.1, max_ttl=0.2), changes
        ),
    )
    await changes.wait(1)
    zone.set({})  # the name is taken out of the zone
    assert await changes.wait(2) == ()
    assert w.targets == ()
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.3"]})
    assert await changes.wait(3) == (Target("10.0.0.3", 80),)


async def test_servfail_keeps_the_last_targets_and_logs_once_per_outage(
    zone: StubZone, watchers: list[DnsWatcher]
) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    with capture_logs() as logs:
        w = start(
            watchers,
            DnsWatcher("api", config(zone, name="api.test", port=80, min_ttl=0.1), changes),
        )
        await changes.wait(1)
        zone.mode = "servfail"
        seen = zone.count("api.test.")
        # Several failed rounds.
        await eventually(lambda: zone.count("api.test.") >= seen + 6)
        assert w.targets == (Target("10.0.0.1", 80),)
        assert len(changes.calls) == 1
        failures = [e for e in logs if e["event"] == "dns_resolve_failed"]
        assert len(failures) == 1
        assert failures[0]["service"] == "api" and failures[0]["log_level"] == "warning"

        zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.4"]})
        zone.mode = "answer"
        assert await changes.wait(2) == (Target("10.0.0.4", 80),)
    assert [e["event"] for e in logs if e["event"].startswith("dns_resolve")] == [
        "dns_resolve_failed",
        "dns_resolve_recovered",
    ]


async def test_an_unanswering_server_keeps_the_last_targets(
    zone: StubZone, watchers: list[DnsWatcher]
) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    with capture_logs() as logs:
        w = DnsWatcher(
            "api", config(zone, name="api.test", port=80, min_ttl=0.1), changes, lifetime=0.3
        )
        start(watchers, w)
        await changes.wait(1)
        zone.mode = "drop"
        await eventually(lambda: any(e["event"] == "dns_resolve_failed" for e in logs))
    assert w.targets == (Target("10.0.0.1", 80),)
    assert len(changes.calls) == 1


async def test_a_stopped_server_keeps_the_last_targets(
    stub: tuple[StubZone, DNSServer], watchers: list[DnsWatcher]
) -> None:
    zone, server = stub
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    with capture_logs() as logs:
        w = DnsWatcher(
            "api", config(zone, name="api.test", port=80, min_ttl=0.1), changes, lifetime=0.3
        )
        start(watchers, w)
        await changes.wait(1)
        await asyncio.to_thread(server.stop)
        server.server.server_close()
        await eventually(lambda: any(e["event"] == "dns_resolve_failed" for e in logs))
    assert w.targets == (Target("10.0.0.1", 80),)
    assert len(changes.calls) == 1


async def test_aclose_stops_asking(zone: StubZone) -> None:
    zone.set({"api.test.": ["api.test. 0 IN A 10.0.0.1"]})
    changes = Changes()
    w = DnsWatcher("api", config(zone, name="api.test", port=80, min_ttl=0.1), changes)
    w.start()
    await changes.wait(1)
    await w.aclose()
    seen = zone.count("api.test.")
    await asyncio.sleep(0.3)  # nothing to wait for: proving an absence
    assert zone.count("api.test.") == seen
