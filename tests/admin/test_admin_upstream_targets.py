"""/upstreams/{service}/targets over real HTTP: the admin app (EmbeddedServer on a
loopback port) with a runtime on SQLite and PostgreSQL.

The registration store is the app's own, with its clock replaced through FastAPI's
dependency override so that expiry is tested without sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tollway.admin.app import AdminState, create_admin_app
from tollway.admin.server import EmbeddedServer
from tollway.admin.upstreams import registration_store
from tollway.config.schema import ServiceConfig
from tollway.observability.health import HealthRegistry
from tollway.runtime import Runtime
from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.upstream.registrations import RegistrationStore

TOKEN = "upstream-targets-admin-token-7d1e"
AUTH = {"authorization": f"Bearer {TOKEN}"}

SERVICES: dict[str, ServiceConfig] = {
    "api": ServiceConfig(name="api", registration=True),
    "img-gen": ServiceConfig(name="img-gen", url="http://127.0.0.1:9", registration=True),
    "static": ServiceConfig(name="static", url="http://127.0.0.1:9"),
}


class UtcClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Admin:
    client: httpx.AsyncClient
    anonymous: httpx.AsyncClient
    store: RegistrationStore
    clock: UtcClock


async def _running(
    database: Database, services: Mapping[str, ServiceConfig] | None
) -> AsyncIterator[Admin]:
    clock = UtcClock()
    store = RegistrationStore(database, clock=clock)
    state = AdminState(
        settings=Settings(),
        health=HealthRegistry(workers=1),
        metrics_render=lambda: (b"", "text/plain"),
        snapshot_info=dict,
        runtime=Runtime(settings=Settings(), database=database, pepper=b"p" * 32),
        admin_token=TOKEN,
        service_configs=None if services is None else (lambda: services),
    )
    app = create_admin_app(state)
    app.dependency_overrides[registration_store] = lambda: store
    server = EmbeddedServer(app, host="127.0.0.1", port=0)
    await server.start()
    try:
        async with (
            httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=10) as client,
            httpx.AsyncClient(base_url=server.url, timeout=10) as anonymous,
        ):
            yield Admin(client, anonymous, store, clock)
    finally:
        await server.stop()


@pytest.fixture
async def admin(database: Database) -> AsyncIterator[Admin]:
    async for running in _running(database, SERVICES):
        yield running


def assert_envelope(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body: dict[str, Any] = r.json()
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    assert body["error"]["code"] == code, body
    assert body["requestId"]
    return body


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_the_routes_need_the_token(admin: Admin) -> None:
    for method, path in [
        ("GET", "/upstreams/api/targets"),
        ("POST", "/upstreams/api/targets"),
        ("POST", "/upstreams/api/targets/h:1/heartbeat"),
        ("DELETE", "/upstreams/api/targets/h:1"),
    ]:
        r = await admin.anonymous.request(method, path, json={"target": "h:1"})
        assert_envelope(r, 401, "unauthorized")
    assert await admin.store.live() == []


async def test_register_refresh_list_heartbeat_deregister(admin: Admin) -> None:
    start = admin.clock.now
    r = await admin.client.post("/upstreams/api/targets", json={"target": "127.0.0.1:9001"})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body == {
        "service": "api",
        "target": "127.0.0.1:9001",
        "weight": 100,
        "tags": [],
        "ttl_seconds": 30.0,
        "expires_at": body["expires_at"],
        "registered_at": body["registered_at"],
    }
    assert parse_time(body["registered_at"]) == start
    assert parse_time(body["expires_at"]) == start + timedelta(seconds=30)

    admin.clock.advance(10)
    r = await admin.client.post(
        "/upstreams/api/targets",
        json={"target": "127.0.0.1:9001", "ttl": "1m", "weight": 5, "tags": ["gpu"]},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["weight"], body["tags"], body["ttl_seconds"]) == (5, ["gpu"], 60.0)
    assert parse_time(body["registered_at"]) == start
    assert parse_time(body["expires_at"]) == admin.clock.now + timedelta(seconds=60)

    r = await admin.client.post("/upstreams/api/targets", json={"target": "[::1]:9002", "ttl": 5})
    assert r.status_code == 201, r.text

    r = await admin.client.get("/upstreams/api/targets")
    assert r.status_code == 200
    assert [(t["target"], t["weight"]) for t in r.json()["data"]] == [
        ("127.0.0.1:9001", 5),
        ("[::1]:9002", 100),
    ]

    admin.clock.advance(4)
    r = await admin.client.post("/upstreams/api/targets/127.0.0.1:9001/heartbeat")
    assert r.status_code == 200, r.text
    assert parse_time(r.json()["expires_at"]) == admin.clock.now + timedelta(seconds=60)
    r = await admin.client.post("/upstreams/api/targets/[::1]:9002/heartbeat", json={"ttl": 20})
    assert r.status_code == 200, r.text
    assert r.json()["ttl_seconds"] == 20.0

    r = await admin.client.delete("/upstreams/api/targets/127.0.0.1:9001")
    assert r.status_code == 204 and r.content == b""
    r = await admin.client.delete("/upstreams/api/targets/127.0.0.1:9001")
    assert_envelope(r, 404, "target_not_found")
    assert [reg.target for reg in await admin.store.live("api")] == ["[::1]:9002"]


async def test_a_target_that_stops_heart_beating_is_gone(admin: Admin) -> None:
    r = await admin.client.post("/upstreams/img-gen/targets", json={"target": "h:1", "ttl": 1})
    assert r.status_code == 201
    admin.clock.advance(1)
    r = await admin.client.post("/upstreams/img-gen/targets/h:1/heartbeat")
    assert_envelope(r, 404, "target_not_found")
    assert (await admin.client.get("/upstreams/img-gen/targets")).json() == {"data": []}
    assert_envelope(await admin.client.delete("/upstreams/img-gen/targets/h:1"), 404,
                    "target_not_found")
    # Registering again is a new registration.
    r = await admin.client.post("/upstreams/img-gen/targets", json={"target": "h:1", "ttl": 1})
    assert r.status_code == 201


async def test_unknown_service_and_registration_off(admin: Admin) -> None:
    for method, path in [
        ("POST", "/upstreams/nope/targets"),
        ("GET", "/upstreams/nope/targets"),
        ("POST", "/upstreams/nope/targets/h:1/heartbeat"),
        ("DELETE", "/upstreams/nope/targets/h:1"),
    ]:
        r = await admin.client.request(method, path, json={"target": "h:1"})
        assert_envelope(r, 404, "service_not_found")
    r = await admin.client.post("/upstreams/static/targets", json={"target": "h:1"})
    body = assert_envelope(r, 409, "registration_disabled")
    assert "registration: true" in body["message"]
    assert await admin.store.live() == []


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"target": "h:1", "ttl": 0.5}, "body.ttl"),
        ({"target": "h:1", "ttl": "2d"}, "body.ttl"),
        ({"target": "h:1", "ttl": "soon"}, "body.ttl"),
        ({"target": "h:1", "ttl": True}, "body.ttl"),
        ({"target": "h:1", "weight": -1}, "body.weight"),
        ({"target": "h:1", "weight": 70000}, "body.weight"),
        ({"target": "h:1", "tags": [""]}, "body.tags[0]"),
        ({"target": "nope"}, "body.target"),
        ({"target": "::1:80"}, "body.target"),
        ({"target": "h:1", "extra": 1}, "body.extra"),
        ({}, "body.target"),
    ],
)
async def test_bad_input_is_a_422_and_writes_nothing(
    admin: Admin, payload: dict[str, Any], field: str
) -> None:
    r = await admin.client.post("/upstreams/api/targets", json=payload)
    body = assert_envelope(r, 422, "validation_error")
    assert field in {d["field"] for d in body["error"]["details"]}, body
    assert await admin.store.live() == []


async def test_bad_path_target_and_heartbeat_ttl_are_422(admin: Admin) -> None:
    r = await admin.client.post("/upstreams/api/targets", json={"target": "h:1"})
    assert r.status_code == 201
    r = await admin.client.post("/upstreams/api/targets/h/heartbeat")
    body = assert_envelope(r, 422, "validation_error")
    assert body["error"]["details"][0]["field"] == "path.target"
    r = await admin.client.post("/upstreams/api/targets/h:1/heartbeat", json={"ttl": "3d"})
    assert_envelope(r, 422, "validation_error")
    r = await admin.client.delete("/upstreams/api/targets/h:x")
    assert_envelope(r, 422, "validation_error")
    r = await admin.client.get("/upstreams/not%20a%20name/targets")
    assert_envelope(r, 422, "validation_error")
    [reg] = await admin.store.live()
    assert reg.ttl_seconds == 30.0


async def test_without_service_configs_any_service_may_register(database: Database) -> None:
    async for admin in _running(database, None):
        r = await admin.client.post("/upstreams/anything/targets", json={"target": "h:1"})
        assert r.status_code == 201, r.text
        assert [reg.service for reg in await admin.store.live()] == ["anything"]
