"""rate-limit: its config, and what clients see through a real gateway (memory store).

The Redis store, its failure modes and the two-process exactness test are in
tests/limits/test_rate_limit_redis.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import GatewayProcess, api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply
from tollway.gateway.app import Gateway
from tollway.identity import consumers, keys, plans
from tollway.identity.changes import pending_changes
from tollway.identity.invalidation import Announcer
from tollway.plugins.base import Plugin
from tollway.plugins.key_auth import KeyAuth
from tollway.plugins.rate_limit import RateLimit, RateLimitConfig

# ---- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"limits": [{"per": "minute", "limit": 0}]},
        {"limits": [{"per": "week", "limit": 1}]},
        {"limits": [{"per": "day", "limit": 5, "burst": 10}]},
        {"limits": [{"per": "minute", "limit": 5}, {"per": "minute", "limit": 9}]},
        {"limits": [{"per": "minute", "limit": 5}], "key_by": "cookie"},
        {"limits": [{"per": "minute", "limit": 5}], "key_by": ["ip", "ip"]},
        {"limits": [{"per": "minute", "limit": 5}], "key_by": "header:bad name"},
        {"limits": [{"per": "minute", "limit": 5}], "key_by": []},
        {"limits": [{"per": "minute", "limit": 5}], "time_zone": "Mars/Olympus"},
        {"limits": [{"per": "minute", "limit": 5}], "before_auth": True},  # key_by consumer
        {"limits": [{"per": "minute", "limit": 5}], "refund_on_status": [99]},
        {"limits": [{"per": "minute", "limit": 5}], "degrade_share": 0},
        {"limits": [{"per": "minute", "limit": 5}], "algorithm": "leaky"},
        {"limits": [], "use_plans": False, "use_key_limits": False},
        {"limits": [{"per": "minute", "limit": 5}], "surprise": 1},
    ],
)
def test_bad_config_is_rejected(cfg: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        RateLimitConfig.model_validate(cfg)


def test_priority_and_hooks_follow_the_config() -> None:
    base = {"limits": [{"per": "minute", "limit": 5}]}
    plain = RateLimit(RateLimitConfig.model_validate(base))
    assert type(plain).priority < KeyAuth.priority  # the consumer is known
    assert not type(plain).overrides("log")  # nothing to refund: no log phase
    refunding = RateLimit(RateLimitConfig.model_validate({**base, "count_only_success": True}))
    assert type(refunding).overrides("log")
    early = RateLimit(RateLimitConfig.model_validate({**base, "before_auth": True, "key_by": "ip"}))
    assert type(early).priority > KeyAuth.priority and type(early).name == "rate-limit"
    assert isinstance(early, Plugin)


def test_header_key_is_normalized_and_a_single_key_by_is_a_list() -> None:
    cfg = RateLimitConfig.model_validate(
        {"limits": [{"per": "second", "limit": 1}], "key_by": "header:X-Org"}
    )
    assert cfg.key_by == ("header:x-org",)


# ---- through a running gateway ---------------------------------------------------------

TRUSTED = "trusted_proxies: [127.0.0.1/32]"


def rl_config(
    url: str, rate_limit: str, key_auth: bool = False, routes: str = "", service: str = ""
) -> str:
    plugins = "plugins:\n"
    if key_auth:
        plugins += "  - name: key-auth\n    config: {log_usage: false}\n"
    plugins += f"  - name: rate-limit\n    config: {rate_limit}\n"
    return api_config(url, plugins, routes=routes, top=TRUSTED, service=service)


# The status tests script one upstream answer per request: no retries may eat one.
NO_RETRIES = "retries: {attempts: 1}"


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream() as up:
        yield up


async def call(
    gw: Gateway, target: str = "/api/x", ip: str = "198.51.100.1", headers: str = ""
) -> Parsed:
    request = f"GET {target} HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: {ip}\r\n{headers}\r\n".encode()
    responses = parse_responses(await exchange_raw(gw.port, request, expect=1))
    assert len(responses) == 1
    return responses[0]


def error_of(resp: Parsed, status: int) -> dict[str, Any]:
    assert resp.status == status, resp.body
    body = resp.json()
    assert isinstance(body, dict) and body["responseStatus"] == "error"
    error: dict[str, Any] = {**body["error"], "message": body["message"]}
    return error


async def test_limit_by_ip_allows_the_limit_then_429(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = "{limits: [{per: minute, limit: 3}], key_by: ip}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg)) as gw:
        seen = [await call(gw) for _ in range(3)]
        assert [r.status for r in seen] == [200, 200, 200]
        assert [r.header("x-ratelimit-remaining") for r in seen] == ["2", "1", "0"]
        assert {r.header("x-ratelimit-limit") for r in seen} == {"3"}
        assert seen[0].header("ratelimit-policy") == '"minute";q=3;w=60'
        assert seen[2].header("ratelimit").startswith('"minute";r=0;t=')
        # GCRA: the bucket refills one request per 20 s, full again within 60 s.
        assert 0 < int(seen[2].header("x-ratelimit-reset") or "0") <= 60

        refused = await call(gw)
        error = error_of(refused, 429)
        assert error["code"] == "rate_limited"
        assert error["details"]["window"] == "minute"
        assert error["details"]["limit"] == 3 and error["details"]["remaining"] == 0
        retry = int(refused.header("retry-after") or "0")
        assert 1 <= retry <= 20 and error["details"]["retry_after"] == retry
        assert refused.header("x-ratelimit-remaining") == "0"
        assert len(upstream.requests) == 3  # the refusal never reached the upstream

        # Another client has its own counter.
        assert (await call(gw, ip="198.51.100.2")).status == 200


async def test_a_refused_request_consumes_nothing(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """Remaining never goes below zero, and refusals do not push the reset further."""
    cfg = "{limits: [{per: hour, limit: 2}], key_by: ip, algorithm: fixed_window}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg)) as gw:
        assert [(await call(gw)).status for _ in range(2)] == [200, 200]
        resets = []
        for _ in range(5):
            resp = await call(gw)
            assert resp.status == 429
            assert resp.header("x-ratelimit-remaining") == "0"
            resets.append(int(resp.header("x-ratelimit-reset") or "0"))
        assert resets == sorted(resets, reverse=True)  # only time moves it


async def test_every_window_must_allow_and_the_refusing_one_is_reported(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = (
        "{limits: [{per: second, limit: 50}, {per: day, limit: 10, cost: 4}],"
        " key_by: ip, time_zone: Europe/Paris}"
    )
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg)) as gw:
        first = await call(gw)
        assert first.status == 200
        # The day window is the most restrictive one after a request costing 4 of 10.
        assert first.header("x-ratelimit-limit") == "10"
        assert first.header("x-ratelimit-remaining") == "6"
        assert first.header("ratelimit-policy") == '"second";q=50;w=1, "day";q=10;w=86400'
        assert (await call(gw)).status == 200
        refused = await call(gw)  # 8 used, 4 more would make 12 > 10
        error = error_of(refused, 429)
        assert error["details"]["window"] == "day"
        assert refused.header("x-ratelimit-remaining") == "2"
        assert refused.header("ratelimit").startswith('"day";r=2;t=')


async def test_a_cost_above_the_limit_is_refused_without_retry_after(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = "{limits: [{per: minute, limit: 3}], key_by: ip, cost: 5}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg)) as gw:
        refused = await call(gw)
        error = error_of(refused, 429)
        assert refused.header("retry-after") is None
        assert "costs more" in error["message"]
        assert upstream.requests == []


async def test_key_by_header_and_route_keep_counters_apart(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    routes = "  - name: second\n    service: up\n    paths: [/second]\n"
    cfg = "{limits: [{per: minute, limit: 1}], key_by: [header:X-Org, route]}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg, routes=routes)) as gw:
        assert (await call(gw, headers="X-Org: acme\r\n")).status == 200
        assert (await call(gw, headers="X-Org: acme\r\n")).status == 429
        assert (await call(gw, headers="X-Org: globex\r\n")).status == 200
        assert (await call(gw, "/second/x", headers="X-Org: acme\r\n")).status == 200
        # Without the header the client IP stands in: not one shared anonymous bucket.
        assert (await call(gw, ip="198.51.100.7")).status == 200
        assert (await call(gw, ip="198.51.100.8")).status == 200
        assert (await call(gw, ip="198.51.100.8")).status == 429


def _status_upstream(statuses: list[int]) -> RecordingUpstream:
    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.send(statuses.pop(0) if statuses else 200, body=b"ok")

    return RecordingUpstream(handler)


async def test_count_only_success_gives_back_failed_requests(tmp_path: Path) -> None:
    statuses = [500, 502, 404, 200, 200]
    async with _status_upstream(statuses) as up:
        cfg = "{limits: [{per: minute, limit: 2}], key_by: ip, count_only_success: true}"
        async with running_gateway(tmp_path, rl_config(up.url, cfg, service=NO_RETRIES)) as gw:
            got = [(await call(gw)).status for _ in range(6)]
    # Three failures were refunded; the two successes used the limit up.
    assert got == [500, 502, 404, 200, 200, 429]


async def test_refund_on_status_gives_back_only_those(tmp_path: Path) -> None:
    statuses = [503, 500, 200]
    async with _status_upstream(statuses) as up:
        cfg = "{limits: [{per: minute, limit: 2}], key_by: ip, refund_on_status: [503]}"
        async with running_gateway(tmp_path, rl_config(up.url, cfg, service=NO_RETRIES)) as gw:
            got = [(await call(gw)).status for _ in range(4)]
    assert got == [503, 500, 200, 429]


async def test_before_auth_limits_bad_keys_and_refunds_what_auth_refused(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    """Ahead of key-auth a limit can be charged and then refused by auth: with
    count_only_success that 401 is given back."""
    cfg = "{limits: [{per: minute, limit: 2}], key_by: ip, before_auth: true}"
    refunding = (
        "{limits: [{per: minute, limit: 2}], key_by: ip, before_auth: true,"
        " count_only_success: true}"
    )
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg, key_auth=True)) as gw:
        got = [(await call(gw, headers="X-API-Key: tw_bad\r\n")).status for _ in range(3)]
        assert got == [401, 401, 429]  # the flood is limited before any key lookup
    (tmp_path / "b").mkdir()
    async with running_gateway(
        tmp_path / "b", rl_config(upstream.url, refunding, key_auth=True)
    ) as gw:
        got = [(await call(gw, headers="X-API-Key: tw_bad\r\n")).status for _ in range(4)]
        assert got == [401, 401, 401, 401]


async def _key(gw: Gateway, email: str, **kw: Any) -> str:
    assert gw.runtime is not None
    async with gw.runtime.database.sessions() as s:
        consumer, _ = await consumers.create_or_get(s, email=email)
        new = await keys.create_key(s, gw.runtime.pepper, consumer_id=consumer.id, **kw)
        await s.commit()
    return new.raw


async def test_per_consumer_limits_and_the_key_override(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = "{limits: [{per: minute, limit: 3}, {per: day, limit: 100}]}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg, key_auth=True)) as gw:
        plain = await _key(gw, "a@example.com")
        tight = await _key(gw, "b@example.com", limit_per_minute=1, limit_per_day=50)
        same_consumer = await _key(gw, "a@example.com")

        def h(raw: str) -> str:
            return f"X-API-Key: {raw}\r\n"

        first = await call(gw, headers=h(tight))
        assert first.status == 200
        assert first.header("ratelimit-policy") == '"minute";q=1;w=60, "day";q=50;w=86400'
        assert (await call(gw, headers=h(tight))).status == 429
        # The consumer's counter is shared by its keys (key_by consumer), across IPs.
        assert (await call(gw, headers=h(plain), ip="198.51.100.20")).status == 200
        assert (await call(gw, headers=h(same_consumer), ip="198.51.100.21")).status == 200
        assert (await call(gw, headers=h(plain))).status == 200
        refused = await call(gw, headers=h(same_consumer))
        assert error_of(refused, 429)["details"]["window"] == "minute"


def _sample(text: str, line_prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_prefix + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_decisions(tmp_path: Path, upstream: RecordingUpstream) -> None:
    cfg = "{limits: [{per: minute, limit: 1}], key_by: ip}"
    name = "tollway_rate_limit_decisions_total"
    allowed = name + '{outcome="allowed",route="api",window="minute"}'
    refused = name + '{outcome="refused",route="api",window="minute"}'
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg)) as gw:
        before = gw.metrics.render()[0].decode()
        await call(gw)
        await call(gw)
        await call(gw)
        after = gw.metrics.render()[0].decode()
    assert _sample(after, allowed) - _sample(before, allowed) == 1
    assert _sample(after, refused) - _sample(before, refused) == 2


# ---- workers without a shared store ------------------------------------------------------


def test_workers_with_memory_limits_are_refused_at_start(tmp_path: Path) -> None:
    """N workers counting alone would allow N times the limit: refused, and the
    message says the three ways out."""
    config = tmp_path / "tollway.yaml"
    cfg = "{limits: [{per: minute, limit: 3}], key_by: ip}"
    config.write_text(rl_config("http://127.0.0.1:9", cfg))
    proc = GatewayProcess(config, workers=2, env={"TOLLWAY_REDIS_URL": ""})
    try:
        proc.spawn()
        assert proc.wait(60) == 2
        out = proc.stderr()
        assert "needs a shared store" in out
        assert "TOLLWAY_REDIS_URL" in out and "--per-worker-limits" in out
    finally:
        proc.kill()
        proc._log.close()


def test_workers_with_explicit_per_worker_limits_start(tmp_path: Path) -> None:
    config = tmp_path / "tollway.yaml"
    cfg = "{limits: [{per: minute, limit: 3}], key_by: ip}"
    config.write_text(rl_config("http://127.0.0.1:9", cfg))
    env = {"TOLLWAY_REDIS_URL": "", "TOLLWAY_PER_WORKER_LIMITS": "true"}
    with GatewayProcess(config, workers=2, env=env) as proc:
        assert proc.proc is not None and proc.proc.poll() is None


# ---- plans and burst grants ---------------------------------------------------------------


async def _apply(gw: Gateway, fn: Any, *args: Any, **kw: Any) -> Any:
    """One identity change, committed and announced (what the admin API does)."""
    assert gw.runtime is not None
    async with gw.runtime.database.sessions() as s:
        result = await fn(s, *args, **kw)
        changes = pending_changes(s)
        await s.commit()
    await Announcer(gw.runtime.redis).announce(changes)
    return result


async def _until_status(gw: Gateway, headers: str, want: int, timeout: float = 3.0) -> float:
    """Send requests until one answers `want`; returns how long that took."""
    started = time.monotonic()
    while True:
        resp = await call(gw, headers=headers)
        if resp.status == want:
            return time.monotonic() - started
        assert time.monotonic() - started < timeout, (resp.status, resp.body)
        await asyncio.sleep(0.02)  # the change travels through the plan book


async def test_a_plan_decides_and_a_plan_change_applies_within_a_second(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = "{limits: [{per: minute, limit: 100}], time_zone: UTC}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg, key_auth=True)) as gw:
        await _apply(gw, plans.create_plan, name="basic", limits=[{"per": "day", "limit": 2}])
        await _apply(gw, plans.create_plan, name="premium", limits=[{"per": "day", "limit": 5}])
        raw = await _key(gw, "p@example.com")
        assert gw.runtime is not None
        async with gw.runtime.database.sessions() as s:
            consumer, _ = await consumers.create_or_get(s, email="p@example.com")
        await _apply(gw, consumers.update_consumer, consumer.id, plan="basic")
        h = f"X-API-Key: {raw}\r\n"
        await _until_status(gw, h, 200)
        resp = await call(gw, headers=h)
        assert resp.status == 200 and resp.header("ratelimit-policy") == '"day";q=2;w=86400'
        assert (await call(gw, headers=h)).status == 429
        # Upgraded mid-day: the two already spent still count against the new 5.
        await _apply(gw, consumers.update_consumer, consumer.id, plan="premium")
        took = await _until_status(gw, h, 200)
        assert took < 1.0
        statuses = [(await call(gw, headers=h)).status for _ in range(3)]
        assert statuses == [200, 200, 429]
        # Editing the plan itself applies as fast.
        await _apply(gw, plans.update_plan, "premium", limits=[{"per": "day", "limit": 6}])
        assert await _until_status(gw, h, 200) < 1.0
        assert (await call(gw, headers=h)).status == 429


async def test_a_burst_grant_raises_the_quota_until_it_expires(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = "{limits: [{per: day, limit: 2}]}"
    async with running_gateway(tmp_path, rl_config(upstream.url, cfg, key_auth=True)) as gw:
        raw = await _key(gw, "g@example.com")
        h = f"X-API-Key: {raw}\r\n"
        assert [(await call(gw, headers=h)).status for _ in range(3)] == [200, 200, 429]
        assert gw.runtime is not None
        async with gw.runtime.database.sessions() as s:
            consumer, _ = await consumers.create_or_get(s, email="g@example.com")
        expires = datetime.now(UTC) + timedelta(seconds=2)
        await _apply(
            gw, plans.create_grant, consumer.id, per="day", extra=2, expires_at=expires,
            reason="launch day",
        )  # fmt: skip
        await _until_status(gw, h, 200)
        resp = await call(gw, headers=h)
        assert resp.status == 200 and resp.header("x-ratelimit-limit") == "4"
        assert (await call(gw, headers=h)).status == 429
        # Expired, the grant is gone by itself: back to 2 per day (all spent).
        while datetime.now(UTC) < expires:
            await asyncio.sleep(0.05)  # waiting for the wall clock to pass the expiry
        resp = await call(gw, headers=h)
        assert resp.status == 429 and resp.header("x-ratelimit-limit") == "2"


# ---- concurrency ----------------------------------------------------------------------------


def held_upstream(release: asyncio.Event) -> RecordingUpstream:
    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        await release.wait()
        reply.send(200, body=b"done")

    return RecordingUpstream(handler)


async def concurrency_run(gw: Gateway, up: RecordingUpstream, release: asyncio.Event) -> None:
    """Two slow requests hold both slots; a third is refused; once they are done,
    the slots are free again."""
    slow = [asyncio.create_task(call(gw)) for _ in range(2)]
    deadline = time.monotonic() + 5
    while len(up.requests) < 2:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)  # both slow requests must have reached the upstream
    refused = await call(gw)
    error = error_of(refused, 429)
    assert error["details"]["window"] == "concurrency" and error["details"]["limit"] == 2
    assert refused.header("retry-after") == "1"
    release.set()
    assert [r.status for r in await asyncio.gather(*slow)] == [200, 200]
    assert [(await call(gw)).status for _ in range(3)] == [200, 200, 200]


async def test_concurrency_limits_requests_in_flight(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with held_upstream(release) as up:
        cfg = "{concurrency: 2, key_by: ip}"
        async with running_gateway(tmp_path, rl_config(up.url, cfg)) as gw:
            await concurrency_run(gw, up, release)
            assert gw.runtime is not None and gw.runtime.limits is not None
            assert len(gw.runtime.limits.memory) == 0  # every slot given back


async def test_a_concurrency_refusal_gives_back_the_window_charge(tmp_path: Path) -> None:
    release = asyncio.Event()
    async with held_upstream(release) as up:
        cfg = "{limits: [{per: hour, limit: 5}], concurrency: 1, key_by: ip}"
        async with running_gateway(tmp_path, rl_config(up.url, cfg)) as gw:
            slow = asyncio.create_task(call(gw))
            deadline = time.monotonic() + 5
            while not up.requests:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)  # the slow request must hold the slot first
            for _ in range(3):
                assert (await call(gw)).status == 429
            release.set()
            assert (await slow).status == 200
            # Only the one served request was charged: 4 of 5 remain.
            assert (await call(gw)).header("x-ratelimit-remaining") == "3"
