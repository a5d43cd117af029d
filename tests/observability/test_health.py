"""HealthRegistry: what liveness, readiness and the detailed report say."""

from __future__ import annotations

import asyncio
import os
from typing import Any

from tollway.observability.health import HealthRegistry


async def healthy() -> dict[str, Any]:
    return {"ping": "PONG"}


async def broken() -> dict[str, Any]:
    raise ConnectionError("connection refused")


async def hangs() -> dict[str, Any]:
    await asyncio.Event().wait()
    return {}


async def test_live_answers_without_running_checks() -> None:
    registry = HealthRegistry()
    registry.add_check("db", broken, required=True)
    live = await registry.live()
    assert live["status"] == "up"
    assert live["pid"] == os.getpid()


async def test_not_ready_until_config_is_loaded() -> None:
    registry = HealthRegistry()
    registry.add_check("redis", healthy, required=True)

    ok, body = await registry.ready()
    assert not ok
    assert body["status"] == "not_ready"
    assert body["config_loaded"] is False

    registry.set_config_loaded(True)
    ok, body = await registry.ready()
    assert ok
    assert body["status"] == "ready"
    assert body["checks"]["redis"]["status"] == "up"
    assert body["checks"]["redis"]["details"] == {"ping": "PONG"}


async def test_a_failing_required_check_makes_it_not_ready_an_optional_one_does_not() -> None:
    registry = HealthRegistry()
    registry.set_config_loaded(True)
    registry.add_check("auth", broken, required=False)
    ok, body = await registry.ready()
    assert ok
    assert "auth" not in body["checks"]

    registry.add_check("db", broken, required=True)
    ok, body = await registry.ready()
    assert not ok
    assert body["checks"]["db"] == {
        "status": "down",
        "required": True,
        "latency_ms": body["checks"]["db"]["latency_ms"],
        "error": "ConnectionError: connection refused",
    }


async def test_a_hung_check_is_down_after_its_timeout() -> None:
    registry = HealthRegistry(default_timeout=0.05)
    registry.set_config_loaded(True)
    registry.add_check("redis", hangs, required=True)

    ok, body = await asyncio.wait_for(registry.ready(), timeout=5)
    assert not ok
    result = body["checks"]["redis"]
    assert result["status"] == "down"
    assert result["error"] == "timed out after 0.05s"
    assert result["latency_ms"] >= 50


async def test_detailed_reports_every_check_and_the_process() -> None:
    registry = HealthRegistry(version="9.9.9", workers=4)
    registry.set_config_loaded(True)
    registry.add_check("db", healthy, required=True)
    registry.add_check("auth", broken, required=False)

    report = await registry.detailed()
    assert report["status"] == "degraded"
    assert report["version"] == "9.9.9"
    assert report["workers"] == 4
    assert report["pid"] == os.getpid()
    assert report["uptime_seconds"] >= 0
    assert set(report["checks"]) == {"db", "auth"}
    assert all(isinstance(c["latency_ms"], float) for c in report["checks"].values())

    registry.add_check("auth", healthy, required=False)
    assert (await registry.detailed())["status"] == "up"
    registry.set_config_loaded(False)
    assert (await registry.detailed())["status"] == "down"


async def test_one_runs_a_single_named_check() -> None:
    registry = HealthRegistry()
    registry.add_check("redis", healthy, required=True)
    registry.add_check("db", broken, required=True)

    assert await registry.one("missing") is None
    ok, body = await registry.one("redis") or (False, {})
    assert ok
    assert body["name"] == "redis"
    assert body["details"] == {"ping": "PONG"}
    ok, body = await registry.one("db") or (True, {})
    assert not ok
    assert body["status"] == "down"
