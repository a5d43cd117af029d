"""The admin API over real HTTP, served by EmbeddedServer inside the test's loop.

The bare app (no runtime): health, metrics, status, docs, the error envelope and
the token guard. The users/keys/usage routers are tested through a real gateway
in test_admin_api.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from tollway.admin.app import AdminState, create_admin_app
from tollway.admin.server import EmbeddedServer, ServerStartError
from tollway.gateway.errors import GatewayError
from tollway.observability.health import HealthRegistry
from tollway.observability.metrics import GatewayMetrics
from tollway.settings import Settings


async def redis_up() -> dict[str, Any]:
    return {"ping": "PONG"}


async def db_down() -> dict[str, Any]:
    raise ConnectionError("db unreachable")


TOKEN = "test-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {TOKEN}"}


def build_app() -> tuple[FastAPI, HealthRegistry]:
    health = HealthRegistry(workers=1)
    health.add_check("redis", redis_up, required=True)
    health.add_check("db", db_down, required=False)
    metrics = GatewayMetrics()
    metrics.request("/v1/admin-test", "admin-test-svc", 201, 0.01, 0.005)
    app = create_admin_app(
        AdminState(
            settings=Settings(),
            health=health,
            metrics_render=metrics.render,
            snapshot_info=lambda: {"generation": 3, "loaded_at": "2025-01-01T00:00:00Z"},
            admin_token=TOKEN,
        )
    )

    # Routes that only exist to drive the installed error handlers.
    @app.get("/test/items")
    async def items(limit: int, tag: str) -> dict[str, Any]:
        return {"limit": limit, "tag": tag}

    @app.get("/test/boom")
    async def boom() -> None:
        raise RuntimeError("secret internal detail")

    @app.get("/test/conflict")
    async def conflict() -> None:
        raise GatewayError("credits_conflict", "Already spent", {"hold": "h1"}, status=409)

    return app, health


@asynccontextmanager
async def running(app: FastAPI, **kwargs: Any) -> AsyncIterator[EmbeddedServer]:
    server = EmbeddedServer(app, **kwargs)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
async def admin() -> AsyncIterator[tuple[httpx.AsyncClient, HealthRegistry]]:
    app, health = build_app()
    async with (
        running(app, host="127.0.0.1", port=0) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        yield client, health


def assert_envelope(body: dict[str, Any], code: str) -> None:
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert isinstance(body["message"], str)
    assert body["requestId"]


async def test_health_is_a_plain_ok_object(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, _ = admin
    r = await client.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"
    live = await client.get("/health/live")
    assert live.status_code == 200
    assert live.json()["status"] == "up"


async def test_ready_is_503_until_the_config_is_loaded(
    admin: tuple[httpx.AsyncClient, HealthRegistry],
) -> None:
    client, health = admin
    r = await client.get("/health/ready", headers={"x-request-id": "probe-1"})
    assert r.status_code == 503
    body = r.json()
    assert_envelope(body, "not_ready")
    assert body["requestId"] == "probe-1"
    assert body["error"]["details"]["config_loaded"] is False

    health.set_config_loaded(True)
    r = await client.get("/health/ready")
    assert r.status_code == 200
    assert r.json()["status"] == "ready"
    # The optional db check being down does not block readiness.
    assert "db" not in r.json()["checks"]


async def test_named_checks(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, _ = admin
    r = await client.get("/health/redis")
    assert r.status_code == 200
    assert r.json()["status"] == "up"
    assert r.json()["details"] == {"ping": "PONG"}

    r = await client.get("/health/db")
    assert r.status_code == 503
    assert_envelope(r.json(), "health_check_failed")
    assert r.json()["error"]["details"]["error"] == "ConnectionError: db unreachable"

    r = await client.get("/health/auth")
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")
    assert sorted(r.json()["error"]["details"]["available"]) == ["db", "redis"]


async def test_detailed_and_status(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, health = admin
    # Down (no config yet): 503 for a monitor, the whole report in the envelope.
    r = await client.get("/health/detailed")
    assert r.status_code == 503
    assert_envelope(r.json(), "unhealthy")
    report = r.json()["error"]["details"]
    assert report["status"] == "down" and report["config_loaded"] is False
    assert {"redis", "db"} == set(report["checks"])

    # Degraded (an optional check down) is still 200.
    health.set_config_loaded(True)
    r = await client.get("/health/detailed")
    assert r.status_code == 200
    detailed = r.json()
    assert detailed["status"] == "degraded"
    assert detailed["pid"] == os.getpid()
    assert {"redis", "db"} == set(detailed["checks"])
    assert all("latency_ms" in c for c in detailed["checks"].values())

    status = (await client.get("/status", headers=AUTH)).json()
    assert status["config"] == {"generation": 3, "loaded_at": "2025-01-01T00:00:00Z"}
    assert status["pid"] == os.getpid()
    assert status["uptime_seconds"] >= 0


async def test_metrics_is_prometheus_text(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, _ = admin
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    assert (
        'tollway_requests_total{route="/v1/admin-test",service="admin-test-svc",status="201"} 1.0'
        in r.text
    )


async def test_docs_and_openapi(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, _ = admin
    assert (await client.get("/docs")).status_code == 200
    spec = (await client.get("/openapi.json")).json()
    assert spec["info"]["title"] == "Tollway admin"
    assert "/health/ready" in spec["paths"]


async def test_errors_use_the_envelope(admin: tuple[httpx.AsyncClient, HealthRegistry]) -> None:
    client, _ = admin
    r = await client.get("/test/items", params={"limit": "many"}, headers=AUTH)
    assert r.status_code == 422
    body = r.json()
    assert_envelope(body, "validation_error")
    fields = {d["field"]: d for d in body["error"]["details"]}
    assert set(fields) == {"query.limit", "query.tag"}
    assert fields["query.tag"]["type"] == "missing"

    r = await client.get("/no/such/admin/path", headers=AUTH)
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")

    r = await client.post("/health")
    assert r.status_code == 405
    assert_envelope(r.json(), "method_not_allowed")

    r = await client.get("/test/conflict", headers=AUTH)
    assert r.status_code == 409
    assert_envelope(r.json(), "credits_conflict")
    assert r.json()["error"]["details"] == {"hold": "h1"}

    r = await client.get("/test/boom", headers=AUTH)
    assert r.status_code == 500
    assert_envelope(r.json(), "internal_error")
    assert "secret" not in r.text
    assert r.headers["x-request-id"] == r.json()["requestId"]


async def test_the_token_guards_everything_but_probes_metrics_and_docs(
    admin: tuple[httpx.AsyncClient, HealthRegistry],
) -> None:
    client, _ = admin
    for path in ("/status", "/test/items", "/no/such/admin/path"):
        r = await client.get(path)
        assert r.status_code == 401, path
        assert_envelope(r.json(), "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.headers["x-request-id"] == r.json()["requestId"]

    wrong = await client.get("/status", headers={"authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401
    assert_envelope(wrong.json(), "unauthorized")
    assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
    # The token is a bearer token: the same string under another scheme is refused.
    basic = await client.get("/status", headers={"authorization": f"Basic {TOKEN}"})
    assert basic.status_code == 401
    # A longer string starting with the token is not the token.
    longer = await client.get("/status", headers={"authorization": f"Bearer {TOKEN}x"})
    assert longer.status_code == 401
    # The scheme name is case-insensitive (RFC 7235).
    lower = await client.get("/status", headers={"authorization": f"bearer {TOKEN}"})
    assert lower.status_code == 200

    for path in ("/health", "/health/live", "/health/redis", "/metrics", "/docs", "/openapi.json"):
        assert (await client.get(path)).status_code == 200, path

    spec = (await client.get("/openapi.json")).json()
    assert "AdminToken" in spec["components"]["securitySchemes"]
    assert spec["paths"]["/status"]["get"]["security"] == [{"AdminToken": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


async def test_unix_socket_and_a_stale_socket_file(tmp_path: Path) -> None:
    path = tmp_path / "run" / "admin.sock"
    path.parent.mkdir()
    # A socket file left behind by a crashed run: nobody listens on it.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()

    app, _ = build_app()
    async with running(app, uds=path) as server:
        assert server.url == f"unix:{path}"
        transport = httpx.AsyncHTTPTransport(uds=str(path))
        async with httpx.AsyncClient(transport=transport, base_url="http://admin") as client:
            assert (await client.get("/health")).json()["status"] == "ok"

        second = EmbeddedServer(app, uds=path)
        with pytest.raises(ServerStartError, match="another process serves it"):
            await second.start()
    assert not path.exists()


async def test_a_taken_port_is_a_clear_error() -> None:
    app, _ = build_app()
    async with running(app, host="127.0.0.1", port=0) as first:
        second = EmbeddedServer(app, host="127.0.0.1", port=first.port)
        with pytest.raises(ServerStartError, match="address already in use"):
            await second.start()


async def test_stop_runs_the_app_shutdown_and_closes_the_port() -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        events.append("startup")
        yield
        events.append("shutdown")

    app = FastAPI(lifespan=lifespan)
    server = EmbeddedServer(app, host="127.0.0.1", port=0)
    sigterm_before = signal.getsignal(signal.SIGTERM)
    await server.start()
    port = server.port
    assert events == ["startup"]
    # The gateway owns SIGTERM/SIGHUP; uvicorn must not have taken them.
    assert signal.getsignal(signal.SIGTERM) is sigterm_before
    await server.stop()
    assert events == ["startup", "shutdown"]
    with contextlib.closing(socket.socket()) as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


async def test_a_failing_app_startup_is_reported() -> None:
    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("cannot open database")
        yield

    server = EmbeddedServer(FastAPI(lifespan=lifespan), host="127.0.0.1", port=0)
    with pytest.raises(ServerStartError, match="failed to start"):
        await server.start()
