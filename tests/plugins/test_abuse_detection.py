"""abuse-detection: its config and hooks, then bans through a real gateway.

The gateway runs in process (same event loop as the test) in front of a real
upstream on loopback that answers 404 under /api/missing, 200 elsewhere. Client
addresses come from X-Forwarded-For, believed because 127.0.0.1 is a trusted proxy.
The admin handlers run in the admin app built for the gateway's runtime.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from plugin_helpers import build_ctx, envelope_of
from pydantic import ValidationError

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply
from tollway import runtime as runtime_mod
from tollway.admin import bans as bans_api
from tollway.admin.app import AdminState, create_admin_app
from tollway.gateway.app import Gateway
from tollway.gateway.context import Response
from tollway.gateway.errors import GatewayError
from tollway.identity import consumers, keys
from tollway.limits.bans import BanStore, MemoryBans
from tollway.limits.redis_bans import RedisBans
from tollway.observability.health import HealthRegistry
from tollway.plugins.abuse_detection import AbuseDetection, AbuseDetectionConfig, normalize_ip
from tollway.runtime import Runtime
from tollway.settings import Settings

ADMIN_TOKEN = "abuse-admin-token-0123456789abcdef"
REDIS_URL = "redis://127.0.0.1:6379/0"

# ---- config and hooks ------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"statuses": []},
        {"statuses": [200]},
        {"threshold": 0},
        {"by": []},
        {"by": ["ip", "ip"]},
        {"by": ["asn"]},
        {"exempt_ips": ["not-an-ip"]},
        {"ban_seconds": 100, "max_ban_seconds": 50},
        {"ban_growth": 0.5},
        {"unknown": 1},
    ],
)
def test_bad_config_is_rejected(cfg: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        AbuseDetectionConfig.model_validate(cfg)


def test_priorities_around_key_auth() -> None:
    # The main hook right after key-auth (1250), so the consumer is known; the
    # IP-only hook ahead of it (and of rate-limit's before_auth 1260).
    assert AbuseDetection.priority == 1240
    assert AbuseDetection.extra_access == (("access_ip", 1300),)
    cfg = AbuseDetectionConfig()
    assert cfg.statuses == (401, 403, 404, 429) and cfg.by == ("ip", "consumer")


def test_mapped_ipv4_is_the_ipv4_address() -> None:
    assert normalize_ip("::ffff:203.0.113.9") == "203.0.113.9"
    assert normalize_ip("::ffff:1") == "::ffff:1"
    assert normalize_ip("2001:db8::1") == "2001:db8::1"


def test_without_a_store_the_plugin_does_nothing() -> None:
    plugin = AbuseDetection(AbuseDetectionConfig(threshold=1))
    ctx = build_ctx()
    assert plugin.access(ctx) is None and plugin.access_ip(ctx) is None
    ctx.status = 404
    plugin.log(ctx)  # no store: nothing to count, no error


async def test_hooks_count_block_and_skip_their_own_403() -> None:
    store = MemoryBans()
    plugin = AbuseDetection(
        AbuseDetectionConfig(threshold=2, exempt_ips=["10.0.0.0/8"], exempt_consumers=["vip"])
    )
    plugin.use_store(store)

    class Who:
        def __init__(self, id: str) -> None:
            self.id = id
            self.username = id + "@example.com"

    def failed(ip: str, consumer: Any = None, status: int = 404) -> None:
        ctx = build_ctx(client_ip=ip, consumer=consumer)
        ctx.status = status
        plugin.log(ctx)

    failed("203.0.113.1", status=500)  # not a failure status
    failed("203.0.113.1", status=200)
    assert store.banned("ip", "203.0.113.1") is None
    failed("::ffff:203.0.113.1", Who("c1"))
    failed("203.0.113.1", status=401)
    ctx = build_ctx(client_ip="203.0.113.1", request_id="rid-1")
    blocked = plugin.access_ip(ctx)
    assert isinstance(blocked, Response) and blocked.status == 403
    body = envelope_of(blocked)
    assert body["error"]["code"] == "temporarily_blocked" and body["requestId"] == "rid-1"
    assert body["error"]["details"] == {"kind": "ip", "retry_after": 600}
    assert (b"retry-after", b"600") in blocked.headers
    # Its own 403 is not a failure: the ban is not lengthened.
    ctx.status = 403
    plugin.log(ctx)
    assert store.counters()["bans:ip"] == 1 and store.counters()["blocked:ip"] == 1
    # Consumer c1 has one failure; a second from another address bans it.
    failed("198.51.100.2", Who("c1"))
    resp = plugin.access(build_ctx(client_ip="198.51.100.3", consumer=Who("c1")))
    assert (
        isinstance(resp, Response) and envelope_of(resp)["error"]["details"]["kind"] == "consumer"
    )
    assert plugin.access(build_ctx(client_ip="198.51.100.3", consumer=Who("c2"))) is None
    # Exempt addresses and consumers are neither counted nor refused.
    for _ in range(5):
        failed("10.1.2.3", Who("vip"))
    assert store.banned("ip", "10.1.2.3") is None and store.banned("consumer", "vip") is None
    await store.ban("ip", "10.9.9.9", 60, "manual")
    assert plugin.access(build_ctx(client_ip="10.9.9.9")) is None  # exempt wins


def test_by_ip_only_counts_no_consumer() -> None:
    store = MemoryBans()
    plugin = AbuseDetection(AbuseDetectionConfig(threshold=1, by=["ip"]))
    plugin.use_store(store)

    class Who:
        id = "c9"

    ctx = build_ctx(client_ip="192.0.2.1", consumer=Who())
    ctx.status = 429
    plugin.log(ctx)
    assert store.banned("ip", "192.0.2.1") is not None
    assert store.banned("consumer", "c9") is None


# ---- through a running gateway -----------------------------------------------------


async def answer(req: Received, reply: Reply) -> None:
    if "/missing" in req.target:
        reply.send(404, [("content-type", "text/plain")], b"no such thing")
    else:
        reply.send(200, [("content-type", "text/plain")], b"ok")


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream(answer) as up:
        yield up


def config(url: str, abuse: str = "threshold: 3", key_auth: bool = False) -> str:
    plugins = "plugins:\n"
    if key_auth:
        plugins += "  - name: key-auth\n    config: {}\n"
    plugins += f"  - name: abuse-detection\n    config: {{{abuse}}}\n"
    return api_config(url, plugins, top="trusted_proxies: [127.0.0.1/32]")


def store_of(gw: Gateway) -> BanStore:
    assert gw.runtime is not None and gw.runtime.bans is not None
    return gw.runtime.bans


async def call(
    gw: Gateway, path: str = "/api/x", ip: str = "203.0.113.10", headers: str = ""
) -> Parsed:
    request = (f"GET {path} HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {ip}\r\n{headers}\r\n").encode()
    responses = parse_responses(await exchange_raw(gw.port, request, expect=1))
    assert len(responses) == 1
    return responses[0]


def blocked_code(resp: Parsed) -> str | None:
    """The error code of a 403 temporarily_blocked, else None."""
    if resp.status != 403:
        return None
    body = resp.json()
    assert isinstance(body, dict) and body["responseStatus"] == "error"
    code: str = body["error"]["code"]
    return code


async def until_answer(
    gw: Gateway, want: Callable[[Parsed], bool], timeout: float = 5.0, **kw: Any
) -> Parsed:
    """Call until the answer satisfies `want` (a ban that ends, or arrives from
    another node, is a change in time: poll it with a deadline)."""
    deadline = time.monotonic() + timeout
    while True:
        resp = await call(gw, **kw)
        if want(resp):
            return resp
        assert time.monotonic() < deadline, f"still {resp.status}: {resp.body!r}"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def admin_client(
    gw: Gateway, token: str | None = ADMIN_TOKEN
) -> AsyncIterator[httpx.AsyncClient]:
    """The admin app for this gateway's runtime, with the /bans router."""
    state = AdminState(
        settings=gw.settings,
        health=HealthRegistry(workers=1),
        metrics_render=lambda: (b"", "text/plain"),
        snapshot_info=dict,
        runtime=gw.runtime,
        admin_token=ADMIN_TOKEN,
    )
    app = create_admin_app(state)
    if not any(getattr(r, "path", None) == "/bans" for r in app.routes):
        app.include_router(bans_api.router)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://admin", headers=headers
    ) as client:
        yield client


async def test_failures_past_the_threshold_ban_that_ip_only(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with running_gateway(tmp_path, config(upstream.url)) as gw:
        for _ in range(3):
            assert (await call(gw, "/api/missing", ip="203.0.113.10")).status == 404
        seen = len(upstream.requests)
        resp = await call(gw, "/api/x", ip="203.0.113.10")
        assert blocked_code(resp) == "temporarily_blocked"
        assert resp.header("retry-after") == "600"
        body = resp.json()
        assert isinstance(body, dict) and body["data"] is None and body["requestId"]
        assert body["error"]["details"] == {"kind": "ip", "retry_after": 600}
        assert len(upstream.requests) == seen  # refused before the upstream
        # Other addresses are not affected.
        assert (await call(gw, "/api/x", ip="203.0.113.11")).status == 200
        assert (await call(gw, "/api/missing", ip="203.0.113.11")).status == 404
        # A banned client that keeps calling does not lengthen its ban.
        store = store_of(gw)
        ban = store.banned("ip", "203.0.113.10")
        for _ in range(5):
            assert blocked_code(await call(gw, ip="203.0.113.10")) == "temporarily_blocked"
        assert store.banned("ip", "203.0.113.10") == ban
        counters = store.counters()
        assert counters["bans:ip"] == 1 and counters["blocked:ip"] == 6
        assert len(upstream.requests) == seen + 2


async def test_401s_count_and_consumer_bans_follow_the_consumer(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with running_gateway(tmp_path, config(upstream.url, key_auth=True)) as gw:
        assert gw.runtime is not None
        raw: dict[str, str] = {}
        async with gw.runtime.database.sessions() as s:
            for name in ("alice", "bob"):
                consumer, _ = await consumers.create_or_get(s, email=f"{name}@example.com")
                raw[name] = (
                    await keys.create_key(s, gw.runtime.pepper, consumer_id=consumer.id)
                ).raw
            await s.commit()
        alice = f"X-API-Key: {raw['alice']}\r\n"
        bob = f"X-API-Key: {raw['bob']}\r\n"
        # Three requests without a key: 401, and the address is banned.
        for _ in range(3):
            assert (await call(gw, ip="198.51.100.1")).status == 401
        resp = await call(gw, ip="198.51.100.1", headers=alice)
        assert blocked_code(resp) == "temporarily_blocked"
        # Alice fails once from each of three addresses: no address reaches the
        # threshold, but she does, wherever she comes from next.
        for i in range(3):
            assert (
                await call(gw, "/api/missing", ip=f"198.51.100.{10 + i}", headers=alice)
            ).status == 404
        resp = await call(gw, ip="198.51.100.20", headers=alice)
        assert blocked_code(resp) == "temporarily_blocked"
        body = resp.json()
        assert isinstance(body, dict) and body["error"]["details"]["kind"] == "consumer"
        assert (await call(gw, ip="198.51.100.20", headers=bob)).status == 200
        assert (await call(gw, ip="198.51.100.10", headers=bob)).status == 200
        store = store_of(gw)
        assert store.banned("ip", "198.51.100.10") is None
        assert store.counters()["bans:consumer"] == 1 and store.counters()["bans:ip"] == 1


async def test_a_ban_expires_by_itself(tmp_path: Path, upstream: RecordingUpstream) -> None:
    abuse = "threshold: 2, ban_seconds: 0.5, statuses: [404]"
    async with running_gateway(tmp_path, config(upstream.url, abuse)) as gw:
        for _ in range(2):
            assert (await call(gw, "/api/missing", ip="192.0.2.50")).status == 404
        resp = await call(gw, ip="192.0.2.50")
        assert blocked_code(resp) == "temporarily_blocked"
        assert resp.header("retry-after") == "1"  # 0.5 s left, rounded up
        started = time.monotonic()
        resp = await until_answer(gw, lambda r: r.status == 200, ip="192.0.2.50")
        assert time.monotonic() - started < 2.0
        assert store_of(gw).banned("ip", "192.0.2.50") is None


async def test_admin_lists_lifts_and_adds_bans(tmp_path: Path, upstream: RecordingUpstream) -> None:
    async with running_gateway(tmp_path, config(upstream.url)) as gw:
        for _ in range(3):
            await call(gw, "/api/missing", ip="203.0.113.30")
        assert blocked_code(await call(gw, ip="203.0.113.30")) == "temporarily_blocked"
        async with admin_client(gw, token=None) as anonymous:
            assert (await anonymous.get("/bans")).status_code == 401
        async with admin_client(gw) as admin:
            resp = await admin.get("/bans")
            assert resp.status_code == 200, resp.text
            page = resp.json()
            assert page["next_cursor"] is None and len(page["items"]) == 1
            item = page["items"][0]
            assert item["kind"] == "ip" and item["value"] == "203.0.113.30"
            assert item["reason"] == "3 failed requests within 60 s" and item["strikes"] == 1
            assert 590 <= item["retry_after"] <= 600
            resp = await admin.delete("/bans/ip/203.0.113.30")
            assert resp.status_code == 200 and resp.json()["lifted"] is True
            assert (await call(gw, ip="203.0.113.30")).status == 200
            resp = await admin.delete("/bans/ip/203.0.113.30")
            assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
            # A manual ban, given as an IPv4-mapped address, bans the IPv4 address.
            resp = await admin.post(
                "/bans", json={"kind": "ip", "value": "::ffff:198.51.100.7", "seconds": 60}
            )
            assert resp.status_code == 201, resp.text
            assert resp.json()["value"] == "198.51.100.7" and resp.json()["reason"] == "manual"
            assert blocked_code(await call(gw, ip="198.51.100.7")) == "temporarily_blocked"
            await admin.post("/bans", json={"kind": "consumer", "value": "c-1", "seconds": 30})
            kinds = [(b["kind"], b["value"]) for b in (await admin.get("/bans")).json()["items"]]
            assert kinds == [("consumer", "c-1"), ("ip", "198.51.100.7")]
            first = (await admin.get("/bans", params={"limit": 1})).json()
            assert [b["value"] for b in first["items"]] == ["c-1"] and first["next_cursor"] == "1"
            rest = (await admin.get("/bans", params={"limit": 1, "cursor": "1"})).json()
            assert [b["value"] for b in rest["items"]] == ["198.51.100.7"]
            assert rest["next_cursor"] is None
            only = (await admin.get("/bans", params={"kind": "consumer"})).json()["items"]
            assert [b["value"] for b in only] == ["c-1"]
            for bad in (
                {"kind": "ip", "value": "not-an-ip", "seconds": 60},
                {"kind": "ip", "value": "192.0.2.1", "seconds": 0},
                {"kind": "asn", "value": "1", "seconds": 60},
                {"kind": "ip", "value": "192.0.2.1", "seconds": 60, "extra": 1},
            ):
                resp = await admin.post("/bans", json=bad)
                assert (
                    resp.status_code == 422 and resp.json()["error"]["code"] == "validation_error"
                )
            resp = await admin.get("/bans", params={"cursor": "x"})
            assert resp.status_code == 422


async def test_without_redis_workers_cannot_be_reached_from_the_admin_api(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, workers=2)
    runtime = Runtime(settings=settings, database=None, pepper=b"", bans=MemoryBans())  # type: ignore[arg-type]
    with pytest.raises(GatewayError) as err:
        bans_api.store_of(runtime)
    assert err.value.status == 409


async def test_a_dead_ban_store_is_a_503_on_the_admin_api(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    dead = RedisBans.from_url(f"redis://127.0.0.1:{_closed_port()}/0", timeout=0.05)
    runtime = Runtime(settings=settings, database=None, pepper=b"", bans=dead)  # type: ignore[arg-type]
    state = AdminState(
        settings=settings,
        health=HealthRegistry(workers=1),
        metrics_render=lambda: (b"", "text/plain"),
        snapshot_info=dict,
        runtime=runtime,
        admin_token=ADMIN_TOKEN,
    )
    app = create_admin_app(state)
    app.include_router(bans_api.router)
    transport = httpx.ASGITransport(app=app)
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://admin", headers=headers
        ) as admin:
            for resp in (
                await admin.get("/bans"),
                await admin.post("/bans", json={"kind": "ip", "value": "::1", "seconds": 5}),
                await admin.delete("/bans/ip/::1"),
            ):
                assert resp.status_code == 503, resp.text
                assert resp.json()["error"]["code"] == "service_unavailable"
                assert resp.headers["retry-after"] == "1"
    finally:
        await dead.aclose()


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.needs_redis
async def test_bans_are_shared_by_two_gateways_through_redis(
    tmp_path: Path, upstream: RecordingUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    from redis.asyncio import Redis

    prefix = f"test:tollway:bans:{uuid.uuid4().hex}:"
    # Bans under a prefix of this test's own, so that nothing collides on the shared Redis.
    monkeypatch.setattr(
        runtime_mod, "open_bans", lambda settings: RedisBans.from_url(REDIS_URL, prefix=prefix)
    )
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    cfg = config(upstream.url)
    try:
        async with (
            running_gateway(tmp_path / "a", cfg, redis_url=REDIS_URL) as a,
            running_gateway(tmp_path / "b", cfg, redis_url=REDIS_URL) as b,
        ):
            store_a, store_b = store_of(a), store_of(b)
            assert isinstance(store_a, RedisBans) and isinstance(store_b, RedisBans)
            for _ in range(3):
                assert (await call(a, "/api/missing", ip="203.0.113.40")).status == 404
            # Counted on A (in the background), enforced on A and B.
            await until_answer(a, lambda r: r.status == 403, ip="203.0.113.40")
            resp = await until_answer(b, lambda r: r.status == 403, ip="203.0.113.40")
            assert blocked_code(resp) == "temporarily_blocked"
            assert (await call(b, ip="203.0.113.41")).status == 200
            async with admin_client(b) as admin:
                items = (await admin.get("/bans")).json()["items"]
                assert [(i["kind"], i["value"]) for i in items] == [("ip", "203.0.113.40")]
                assert (await admin.delete("/bans/ip/203.0.113.40")).status_code == 200
            await until_answer(a, lambda r: r.status == 200, ip="203.0.113.40")
    finally:
        client: Redis = Redis.from_url(REDIS_URL)
        found = [k async for k in client.scan_iter(match=prefix + "*", count=500)]
        if found:
            await client.delete(*found)
        await client.aclose()


async def test_a_banned_ip_is_refused_before_any_key_lookup(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """The IP check runs at 1300, ahead of key-auth (1250): a banned client with a
    made-up key gets 403 temporarily_blocked, never a 401 from a key lookup."""
    async with running_gateway(tmp_path, config(upstream.url, key_auth=True)) as gw:
        assert gw.runtime is not None and gw.runtime.keys is not None
        await store_of(gw).ban("ip", "203.0.113.77", 60, "test")
        resolver = gw.runtime.keys
        seen = (resolver.misses, resolver.malformed)
        resp = await call(gw, ip="203.0.113.77", headers="X-API-Key: tw_live_madeup\r\n")
        assert blocked_code(resp) == "temporarily_blocked"
        assert (resolver.misses, resolver.malformed) == seen  # key-auth never ran
        other = await call(gw, ip="203.0.113.78", headers="X-API-Key: tw_live_madeup\r\n")
        assert other.status == 401
