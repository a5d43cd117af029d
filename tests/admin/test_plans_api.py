"""The plans and grants admin API over HTTP, served by a real gateway, on SQLite and
PostgreSQL; and the gateway's own PlanBook, which hears each change at once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from admin_helpers import BACKENDS, AdminApi, admin_api, assert_envelope, fields_of

from tollway.limits.plans import Plan, PlanBook, WindowSpec


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AdminApi]:
    # The outbox poll is slowed right down: what the gateway's PlanBook sees in
    # time, it heard from the in-process announcement.
    async with admin_api(tmp_path, request.param, invalidation_poll_interval=30.0) as running:
        yield running


def book_of(api: AdminApi) -> PlanBook:
    runtime = api.gateway.runtime
    assert runtime is not None and runtime.plans is not None
    return runtime.plans


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> float:
    start = time.monotonic()
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
    return time.monotonic() - start


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


async def test_plan_and_grant_routes_need_the_token(api: AdminApi) -> None:
    some = str(uuid.uuid4())
    calls = [
        ("GET", "/plans"),
        ("POST", "/plans"),
        ("GET", "/plans/pro"),
        ("PATCH", "/plans/pro"),
        ("DELETE", "/plans/pro"),
        ("GET", f"/users/{some}/grants"),
        ("POST", f"/users/{some}/grants"),
        ("DELETE", f"/users/{some}/grants/{some}"),
    ]
    for method, path in calls:
        r = await api.anonymous.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.text)
        assert_envelope(r.json(), "unauthorized")
    spec = (await api.anonymous.get("/openapi.json")).json()
    for path in (
        "/plans",
        "/plans/{name}",
        "/users/{user_id}/grants",
        "/users/{user_id}/grants/{grant_id}",
    ):
        assert path in spec["paths"], path


async def test_plans_crud_reaches_the_gateways_book_at_once(api: AdminApi) -> None:
    book = book_of(api)
    r = await api.client.post(
        "/plans",
        json={
            "name": "pro",
            "limits": [{"per": "day", "limit": 1000}, {"per": "second", "limit": 5, "burst": 10}],
            "description": "Pro",
        },
    )
    assert r.status_code == 201, r.text
    pro = r.json()
    assert pro["name"] == "pro" and pro["description"] == "Pro"
    assert pro["limits"] == [
        {"per": "second", "limit": 5, "burst": 10, "cost": None},
        {"per": "day", "limit": 1000, "burst": None, "cost": None},
    ]
    assert await eventually(lambda: book.plan("pro") is not None) < 1.0
    assert book.plan("pro") == Plan(
        "pro", (WindowSpec("second", 5, burst=10), WindowSpec("day", 1000)), "Pro"
    )

    r = await api.client.post("/plans", json={"name": "pro"})
    assert r.status_code == 409
    assert_envelope(r.json(), "conflict")
    assert r.json()["error"]["details"] == {"field": "body.name"}

    assert (await api.client.get("/plans/pro")).json() == pro
    r = await api.client.get("/plans/nope")
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")

    r = await api.client.patch("/plans/pro", json={"limits": [{"per": "minute", "limit": 60}]})
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == [{"per": "minute", "limit": 60, "burst": None, "cost": None}]
    assert r.json()["description"] == "Pro"
    assert parse_time(r.json()["updated_at"]) >= parse_time(pro["updated_at"])
    waited = await eventually(
        lambda: book.plan("pro") == Plan("pro", (WindowSpec("minute", 60),), "Pro")
    )
    assert waited < 1.0
    r = await api.client.patch("/plans/pro", json={"description": "Pro plan"})
    assert r.json()["description"] == "Pro plan"
    assert r.json()["limits"] == [{"per": "minute", "limit": 60, "burst": None, "cost": None}]

    for i in range(3):
        assert (await api.client.post("/plans", json={"name": f"p{i}"})).status_code == 201
    first = (await api.client.get("/plans", params={"limit": 3})).json()
    assert [p["name"] for p in first["items"]] == ["p2", "p1", "p0"]
    rest = (await api.client.get("/plans", params={"cursor": first["next_cursor"]})).json()
    assert [p["name"] for p in rest["items"]] == ["pro"] and rest["next_cursor"] is None

    r = await api.client.delete("/plans/p0")
    assert r.status_code == 204 and r.content == b""
    assert (await api.client.get("/plans/p0")).status_code == 404
    assert (await api.client.delete("/plans/p0")).status_code == 404
    assert await eventually(lambda: book.plan("p0") is None) < 1.0


async def test_plan_errors_are_enveloped_with_field_paths(api: AdminApi) -> None:
    cases = [
        ({"name": "has space"}, {"body.name"}),
        ({"name": "x", "limits": [{"per": "week", "limit": 1}]}, {"body.limits[0].per"}),
        ({"name": "x", "limits": [{"per": "day", "limit": 0}]}, {"body.limits[0].limit"}),
        (
            {"name": "x", "limits": [{"per": "day", "limit": 1, "brust": 1}]},
            {"body.limits[0].brust"},
        ),
        # Found by the domain checks, named the same way.
        (
            {"name": "x", "limits": [{"per": "day", "limit": 1, "burst": 5}]},
            {"body.limits[0].burst"},
        ),
        (
            {"name": "x", "limits": [{"per": "day", "limit": 1}, {"per": "day", "limit": 2}]},
            {"body.limits[1].per"},
        ),
        ({"name": "x", "colour": "red"}, {"body.colour"}),
    ]
    for body, fields in cases:
        r = await api.client.post("/plans", json=body)
        assert r.status_code == 422, (body, r.text)
        assert_envelope(r.json(), "validation_error")
        assert fields_of(r.json()) == fields, body
    assert (await api.client.post("/plans", json={"name": "x"})).status_code == 201
    r = await api.client.patch("/plans/x", json={"limits": None})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"body.limits"}
    r = await api.client.patch(
        "/plans/x", json={"limits": [{"per": "month", "limit": 1, "burst": 2}]}
    )
    assert fields_of(r.json()) == {"body.limits[0].burst"}
    r = await api.client.get("/plans", params={"cursor": "junk"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.cursor"}


async def test_a_plan_in_use_cannot_be_deleted_and_users_name_existing_plans(
    api: AdminApi,
) -> None:
    assert (await api.client.post("/plans", json={"name": "gold"})).status_code == 201
    a = await api.user("a@example.com")
    b = await api.user("b@example.com")
    r = await api.client.patch(f"/users/{a['id']}", json={"plan": "gold"})
    assert r.status_code == 200 and r.json()["plan"] == "gold"
    assert (await api.client.patch(f"/users/{b['id']}", json={"plan": "gold"})).status_code == 200

    r = await api.client.patch(f"/users/{b['id']}", json={"plan": "platinum"})
    assert r.status_code == 422
    assert_envelope(r.json(), "validation_error")
    assert fields_of(r.json()) == {"body.plan"}
    assert (await api.client.get(f"/users/{b['id']}")).json()["plan"] == "gold"

    # Creating a user on a plan that does not exist is refused the same way, and
    # leaves no user behind; on an existing plan it goes through.
    r = await api.client.post("/users", json={"email": "c@example.com", "plan": "platinum"})
    assert r.status_code == 422
    assert_envelope(r.json(), "validation_error")
    assert fields_of(r.json()) == {"body.plan"}
    r = await api.client.get("/users/by-email", params={"email": "c@example.com"})
    assert r.status_code == 404
    r = await api.client.post("/users", json={"email": "c@example.com", "plan": "gold"})
    assert r.status_code == 201 and r.json()["plan"] == "gold"
    c_id = r.json()["id"]

    r = await api.client.delete("/plans/gold")
    assert r.status_code == 409
    body = r.json()
    assert_envelope(body, "conflict")
    assert "3 users" in body["message"]
    assert body["error"]["details"] == {"field": "path.name"}
    assert (await api.client.get("/plans/gold")).status_code == 200

    # Clearing the plan needs no plan; then the delete goes through.
    for user_id in (a["id"], b["id"], c_id):
        r = await api.client.patch(f"/users/{user_id}", json={"plan": None})
        assert r.status_code == 200 and r.json()["plan"] is None
    assert (await api.client.delete("/plans/gold")).status_code == 204


async def test_grants_create_list_revoke(api: AdminApi) -> None:
    book = book_of(api)
    user = await api.user("grant@example.com")
    base = f"/users/{user['id']}/grants"

    r = await api.client.post(
        base, json={"per": "minute", "extra": 100, "ttl_seconds": 3600, "reason": "launch"}
    )
    assert r.status_code == 201, r.text
    g1 = r.json()
    assert (g1["user_id"], g1["per"], g1["extra"], g1["reason"]) == (
        user["id"],
        "minute",
        100,
        "launch",
    )
    assert g1["active"] is True and g1["revoked_at"] is None
    expires = parse_time(g1["expires_at"])
    assert abs((expires - datetime.now(UTC)).total_seconds() - 3600) < 60

    at = (datetime.now(UTC) + timedelta(days=2)).replace(microsecond=0)
    r = await api.client.post(base, json={"per": "day", "extra": 5, "expires_at": at.isoformat()})
    assert r.status_code == 201, r.text
    g2 = r.json()
    assert parse_time(g2["expires_at"]) == at

    waited = await eventually(lambda: len(book.grants(user["id"], time.time())) == 2)
    assert waited < 1.0
    # The book filters by the clock it is given: past the first expiry, one is left.
    later = expires.timestamp() + 1
    assert [g.id for g in book.grants(user["id"], later)] == [g2["id"]]

    listed = (await api.client.get(base)).json()
    assert {g["id"] for g in listed["items"]} == {g1["id"], g2["id"]}

    r = await api.client.delete(f"{base}/{g1['id']}")
    assert r.status_code == 200
    assert r.json()["active"] is False and r.json()["revoked_at"] is not None
    waited = await eventually(
        lambda: [g.id for g in book.grants(user["id"], time.time())] == [g2["id"]]
    )
    assert waited < 1.0
    assert [g["id"] for g in (await api.client.get(base)).json()["items"]] == [g2["id"]]
    every = (await api.client.get(base, params={"all": "true"})).json()["items"]
    assert {g["id"]: g["active"] for g in every} == {g1["id"]: False, g2["id"]: True}
    # Revoking again is harmless; another user's grant is not found.
    assert (await api.client.delete(f"{base}/{g1['id']}")).status_code == 200
    other = await api.user("other@example.com")
    r = await api.client.delete(f"/users/{other['id']}/grants/{g2['id']}")
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")


async def test_grant_errors_are_enveloped_with_field_paths(api: AdminApi) -> None:
    user = await api.user("bad-grant@example.com")
    base = f"/users/{user['id']}/grants"
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    too_far = (datetime.now(UTC) + timedelta(days=32)).isoformat()
    cases = [
        ({"per": "week", "extra": 1, "ttl_seconds": 60}, {"body.per"}),
        ({"per": "day", "extra": 0, "ttl_seconds": 60}, {"body.extra"}),
        ({"per": "day", "extra": 1, "ttl_seconds": 0}, {"body.ttl_seconds"}),
        ({"per": "day", "extra": 1, "ttl_seconds": 32 * 86400}, {"body.ttl_seconds"}),
        ({"per": "day", "extra": 1}, {"body.expires_at"}),
        ({"per": "day", "extra": 1, "ttl_seconds": 60, "expires_at": soon}, {"body.expires_at"}),
        ({"per": "day", "extra": 1, "expires_at": past}, {"body.expires_at"}),
        ({"per": "day", "extra": 1, "expires_at": too_far}, {"body.expires_at"}),
        ({"per": "day", "extra": 1, "ttl_seconds": 60, "reason": "x" * 201}, {"body.reason"}),
    ]
    for body, fields in cases:
        r = await api.client.post(base, json=body)
        assert r.status_code == 422, (body, r.text)
        assert_envelope(r.json(), "validation_error")
        assert fields_of(r.json()) == fields, body

    missing = f"/users/{uuid.uuid4()}/grants"
    r = await api.client.post(missing, json={"per": "day", "extra": 1, "ttl_seconds": 60})
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")
    assert (await api.client.get(missing)).status_code == 404
    r = await api.client.get("/users/not-a-uuid/grants")
    assert r.status_code == 422
    assert fields_of(r.json()) == {"path.user_id"}
    r = await api.client.delete(f"{base}/not-a-uuid")
    assert fields_of(r.json()) == {"path.grant_id"}
