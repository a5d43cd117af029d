"""The users, keys and usage admin API, over HTTP, served by a real gateway.

Every test runs twice: on the SQLite file in the data directory and on a fresh
PostgreSQL database (TOLLWAY_DATABASE_URL), as an operator would run them.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from admin_helpers import BACKENDS, AdminApi, admin_api, assert_envelope, fields_of

from tollway.identity.apikeys import hash_key, is_well_formed
from tollway.usage.events import UsageEvent


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AdminApi]:
    async with admin_api(tmp_path, request.param) as running:
        yield running


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# ---------------------------------------------------------------- the guard


async def test_every_resource_needs_the_token(api: AdminApi) -> None:
    user = await api.user("guard@example.com")
    some_id = user["id"]
    calls = [
        ("GET", "/users"),
        ("POST", "/users"),
        ("GET", f"/users/{some_id}"),
        ("GET", "/users/by-email?email=guard@example.com"),
        ("PATCH", f"/users/{some_id}"),
        ("DELETE", f"/users/{some_id}"),
        ("GET", "/keys"),
        ("POST", "/keys"),
        ("GET", f"/keys/{some_id}"),
        ("PATCH", f"/keys/{some_id}"),
        ("DELETE", f"/keys/{some_id}"),
        ("POST", f"/keys/{some_id}/rotate"),
        ("GET", "/usage"),
        ("GET", f"/usage/{some_id}"),
        ("GET", "/status"),
    ]
    for method, path in calls:
        r = await api.anonymous.request(method, path, json={})
        assert r.status_code == 401, (method, path, r.text)
        assert_envelope(r.json(), "unauthorized")
        assert r.headers["www-authenticate"].startswith("Bearer")
        wrong = await api.anonymous.request(
            method, path, json={}, headers={"authorization": "Bearer guessed"}
        )
        assert wrong.status_code == 401, (method, path)
    # Nothing was changed by the refused calls.
    assert (await api.client.get(f"/users/{some_id}")).json()["status"] == "active"
    # Probes and scrapers need no token.
    for path in ("/health", "/health/live", "/health/ready", "/metrics", "/openapi.json"):
        assert (await api.anonymous.get(path)).status_code == 200, path
    assert (await api.client.get("/status")).status_code == 200


async def test_openapi_describes_the_resources(api: AdminApi) -> None:
    spec = (await api.anonymous.get("/openapi.json")).json()
    for path in ("/users", "/users/by-email", "/users/{id}", "/keys", "/keys/{id}",
                 "/keys/{id}/rotate", "/usage", "/usage/{key_id}"):
        assert path in spec["paths"], path
    assert spec["paths"]["/keys"]["post"]["security"] == [{"AdminToken": []}]
    created = spec["paths"]["/keys"]["post"]["responses"]["201"]
    assert created["content"]["application/json"]["schema"]["$ref"].endswith("/KeyCreated")


# ---------------------------------------------------------------- users


async def test_users_create_or_get_read_update(api: AdminApi) -> None:
    # A user's plan must exist (test_plans_api checks the refusal).
    assert (await api.client.post("/plans", json={"name": "pro"})).status_code == 201
    r = await api.client.post(
        "/users",
        json={"email": "  Ada@Example.COM ", "name": "Ada", "plan": "pro", "metadata": {"t": 1}},
    )
    assert r.status_code == 201, r.text
    ada = r.json()
    assert ada["email"] == "ada@example.com"
    assert (ada["name"], ada["plan"], ada["status"], ada["metadata"]) == ("Ada", "pro", "active",
                                                                          {"t": 1})
    uuid.UUID(ada["id"])
    assert parse_time(ada["created_at"]).tzinfo is not None

    # The same email again (any case): the existing user, 200, unchanged.
    again = await api.client.post("/users", json={"email": "ADA@example.com", "name": "Other"})
    assert again.status_code == 200
    assert again.json() == ada

    by_email = await api.client.get("/users/by-email", params={"email": "ada@EXAMPLE.com"})
    assert by_email.status_code == 200
    assert by_email.json()["id"] == ada["id"]
    assert (await api.client.get(f"/users/{ada['id']}")).json() == ada

    r = await api.client.patch(f"/users/{ada['id']}", json={"name": "Ada L.", "plan": None})
    assert r.status_code == 200, r.text
    patched = r.json()
    assert (patched["name"], patched["plan"], patched["email"]) == ("Ada L.", None,
                                                                    "ada@example.com")
    assert parse_time(patched["updated_at"]) >= parse_time(ada["updated_at"])
    r = await api.client.patch(f"/users/{ada['id']}", json={"email": "ada@new.example.com"})
    assert r.json()["email"] == "ada@new.example.com"
    r = await api.client.patch(f"/users/{ada['id']}", json={"status": "disabled"})
    assert r.json()["status"] == "disabled"

    listed = (await api.client.get("/users", params={"status": "disabled"})).json()
    assert [u["id"] for u in listed["items"]] == [ada["id"]]
    assert listed["next_cursor"] is None
    assert (await api.client.get("/users", params={"status": "active"})).json()["items"] == []
    by_filter = await api.client.get("/users", params={"email": "ada@new.example.com"})
    assert [u["id"] for u in by_filter.json()["items"]] == [ada["id"]]


async def test_user_errors_are_enveloped_with_field_paths(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    bob = await api.user("bob@example.com")

    # Duplicate email on PATCH: 409.
    r = await api.client.patch(f"/users/{bob['id']}", json={"email": "ADA@example.com"})
    assert r.status_code == 409
    assert_envelope(r.json(), "conflict")
    assert r.json()["error"]["details"] == {"field": "body.email"}
    assert (await api.client.get(f"/users/{bob['id']}")).json()["email"] == "bob@example.com"

    # Unknown ids: 404.
    missing = uuid.uuid4()
    for method in ("GET", "PATCH", "DELETE"):
        r = await api.client.request(method, f"/users/{missing}", json={})
        assert r.status_code == 404, method
        assert_envelope(r.json(), "not_found")
    r = await api.client.get("/users/by-email", params={"email": "nobody@example.com"})
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")

    # Malformed UUID: 422 naming the path parameter.
    r = await api.client.get("/users/not-a-uuid")
    assert r.status_code == 422
    assert_envelope(r.json(), "validation_error")
    assert fields_of(r.json()) == {"path.id"}

    # Bad input from pydantic and from the identity layer both name body fields.
    r = await api.client.post("/users", json={"email": "not an email"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"body.email"}
    r = await api.client.post("/users", json={"name": "no email"})
    assert fields_of(r.json()) == {"body.email"}
    r = await api.client.post("/users", json={"email": "c@example.com", "nmae": "typo"})
    assert fields_of(r.json()) == {"body.nmae"}
    r = await api.client.patch(f"/users/{ada['id']}", json={"name": None, "status": "gone"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"body.name", "body.status"}
    r = await api.client.get("/users/by-email", params={"email": "@@"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.email"}
    r = await api.client.get("/users", params={"status": "sleeping"})
    assert fields_of(r.json()) == {"query.status"}
    r = await api.client.post("/users", content=b"{not json", headers={
        "content-type": "application/json"})
    assert r.status_code == 422
    assert_envelope(r.json(), "validation_error")


async def test_deleting_a_user_disables_them_and_revokes_their_keys(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    other = await api.user("other@example.com")
    k1 = await api.key(ada["id"], name="one")
    k2 = await api.key(ada["id"], name="two")
    await api.client.patch(f"/keys/{k2['id']}", json={"status": "disabled"})
    untouched = await api.key(other["id"])

    r = await api.client.delete(f"/users/{ada['id']}")
    assert r.status_code == 200
    assert r.json()["id"] == ada["id"]
    assert r.json()["status"] == "disabled"

    keys = (await api.client.get("/keys", params={"user_id": ada["id"]})).json()["items"]
    assert {k["id"]: k["status"] for k in keys} == {k1["id"]: "revoked", k2["id"]: "revoked"}
    assert all(k["revoked_at"] for k in keys)
    assert (await api.client.get(f"/keys/{untouched['id']}")).json()["status"] == "active"
    # History stays: the user and the keys can still be read.
    assert (await api.client.get(f"/users/{ada['id']}")).json()["email"] == "ada@example.com"
    # A disabled user gets no new key.
    r = await api.client.post("/keys", json={"user_id": ada["id"]})
    assert r.status_code == 409
    assert_envelope(r.json(), "conflict")
    # Deleting again is harmless.
    assert (await api.client.delete(f"/users/{ada['id']}")).status_code == 200


# ---------------------------------------------------------------- keys


async def test_key_create_shows_the_raw_key_once_and_never_a_hash(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    expires = (datetime.now(UTC) + timedelta(days=30)).replace(microsecond=0)
    r = await api.client.post(
        "/keys",
        json={
            "user_id": ada["id"],
            "name": "ci",
            "limit_per_minute": 60,
            "limit_per_day": 10000,
            "scopes": ["images", "tag:beta"],
            "expires_at": expires.isoformat(),
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    raw = created["key"]
    assert is_well_formed(raw)
    assert raw.startswith(created["prefix"]) and created["prefix"].startswith("tw_live_")
    assert created["user_id"] == ada["id"]
    assert (created["name"], created["status"]) == ("ci", "active")
    assert (created["limit_per_minute"], created["limit_per_day"]) == (60, 10000)
    assert created["scopes"] == ["images", "tag:beta"]
    assert parse_time(created["expires_at"]) == expires
    assert created["last_used_at"] is None and created["revoked_at"] is None

    assert api.gateway.runtime is not None
    digest = hash_key(api.gateway.runtime.pepper, raw)
    assert digest not in r.text
    for response in (
        await api.client.get(f"/keys/{created['id']}"),
        await api.client.get("/keys"),
        await api.client.get("/keys", params={"user_id": ada["id"]}),
    ):
        assert response.status_code == 200
        assert raw not in response.text
        assert digest not in response.text
        assert '"key"' not in response.text and "hash" not in response.text

    fetched = (await api.client.get(f"/keys/{created['id']}")).json()
    assert fetched == {k: v for k, v in created.items() if k != "key"}


async def test_key_update_disable_enable_and_revoke(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    key = await api.key(ada["id"], limit_per_minute=5)

    r = await api.client.patch(f"/keys/{key['id']}", json={"status": "disabled"})
    assert r.status_code == 200
    assert r.json()["status"] == "disabled"
    disabled = await api.client.get("/keys", params={"status": "disabled"})
    assert [k["id"] for k in disabled.json()["items"]] == [key["id"]]

    r = await api.client.patch(
        f"/keys/{key['id']}",
        json={"status": "active", "limit_per_minute": None, "limit_per_day": 7,
              "scopes": ["tag:x"], "name": "renamed"},
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["status"], body["limit_per_minute"], body["limit_per_day"]) == ("active", None, 7)
    assert (body["scopes"], body["name"]) == (["tag:x"], "renamed")
    later = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    r = await api.client.patch(f"/keys/{key['id']}", json={"expires_at": later.isoformat()})
    assert parse_time(r.json()["expires_at"]) == later
    r = await api.client.patch(f"/keys/{key['id']}", json={"expires_at": None})
    assert r.json()["expires_at"] is None

    r = await api.client.delete(f"/keys/{key['id']}")
    assert r.status_code == 200
    assert r.json()["status"] == "revoked" and r.json()["revoked_at"]
    # A revoked key cannot come back, and cannot be rotated.
    r = await api.client.patch(f"/keys/{key['id']}", json={"status": "active"})
    assert r.status_code == 409
    assert_envelope(r.json(), "conflict")
    r = await api.client.post(f"/keys/{key['id']}/rotate", json={})
    assert r.status_code == 409
    assert (await api.client.get(f"/keys/{key['id']}")).json()["status"] == "revoked"


async def test_key_errors_are_enveloped_with_field_paths(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    key = await api.key(ada["id"])
    missing = str(uuid.uuid4())

    r = await api.client.post("/keys", json={"user_id": missing})
    assert r.status_code == 404
    assert_envelope(r.json(), "not_found")
    for method, path in (("GET", f"/keys/{missing}"), ("PATCH", f"/keys/{missing}"),
                         ("DELETE", f"/keys/{missing}"), ("POST", f"/keys/{missing}/rotate"),
                         ("GET", f"/usage/{missing}"), ("GET", f"/usage?user_id={missing}")):
        r = await api.client.request(method, path, json={})
        assert r.status_code == 404, (method, path)
        assert_envelope(r.json(), "not_found")

    r = await api.client.get("/keys/123")
    assert r.status_code == 422
    assert fields_of(r.json()) == {"path.id"}
    r = await api.client.get("/keys", params={"user_id": "ada"})
    assert fields_of(r.json()) == {"query.user_id"}
    r = await api.client.post("/keys", json={"user_id": "nope"})
    assert fields_of(r.json()) == {"body.user_id"}
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    r = await api.client.post(
        "/keys",
        json={"user_id": ada["id"], "limit_per_minute": 0, "scopes": "images",
              "expires_at": "soon"},
    )
    assert r.status_code == 422
    assert fields_of(r.json()) == {"body.limit_per_minute", "body.scopes", "body.expires_at"}
    # Refused by the identity layer rather than by the schema: still body.expires_at.
    r = await api.client.post("/keys", json={"user_id": ada["id"], "expires_at": past})
    assert r.status_code == 422
    assert_envelope(r.json(), "validation_error")
    assert fields_of(r.json()) == {"body.expires_at"}
    r = await api.client.patch(f"/keys/{key['id']}", json={"status": "revoked"})
    assert fields_of(r.json()) == {"body.status"}
    r = await api.client.patch(f"/keys/{key['id']}", json={"scopes": None})
    assert fields_of(r.json()) == {"body.scopes"}
    r = await api.client.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": -1})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"body.grace_seconds"}
    r = await api.client.get("/keys", params={"cursor": "garbage!"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.cursor"}
    # Nothing above changed the key.
    assert (await api.client.get(f"/keys/{key['id']}")).json()["status"] == "active"


async def test_rotate_issues_a_new_key_and_says_when_the_old_one_stops(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    key = await api.key(ada["id"], scopes=["images"], limit_per_minute=9)

    before = datetime.now(UTC)
    r = await api.client.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 3600})
    assert r.status_code == 200, r.text
    rotated = r.json()
    assert rotated["id"] == key["id"]
    assert is_well_formed(rotated["key"]) and rotated["key"] != key["key"]
    assert rotated["key"].startswith(rotated["prefix"])
    assert (rotated["scopes"], rotated["limit_per_minute"]) == (["images"], 9)
    stops = parse_time(rotated["previous_expires_at"])
    assert before + timedelta(seconds=3600) <= stops <= datetime.now(UTC) + timedelta(seconds=3600)

    # No body: the default grace of 24 hours.
    before = datetime.now(UTC)
    r = await api.client.post(f"/keys/{key['id']}/rotate")
    assert r.status_code == 200, r.text
    third = r.json()
    assert third["key"] not in (key["key"], rotated["key"])
    # The first secret keeps its earlier stop; the second stops in 24 h: the later one.
    stops = parse_time(third["previous_expires_at"])
    assert before + timedelta(hours=24) <= stops <= datetime.now(UTC) + timedelta(hours=24)

    # Grace 0: the previous secret stops now.
    r = await api.client.post(f"/keys/{key['id']}/rotate", json={"grace_seconds": 0})
    assert parse_time(r.json()["previous_expires_at"]) <= datetime.now(UTC)


# ---------------------------------------------------------------- pagination


async def test_lists_page_with_cursors_without_gaps_or_duplicates(api: AdminApi) -> None:
    users = [await api.user(f"user{i}@example.com") for i in range(7)]
    ada = users[0]
    keys = [await api.key(ada["id"], name=f"k{i}") for i in range(7)]

    for path, params, made in (
        ("/users", {}, users),
        ("/keys", {"user_id": ada["id"]}, keys),
    ):
        seen: list[str] = []
        pages = 0
        cursor: str | None = None
        while True:
            query: dict[str, Any] = {**params, "limit": 3}
            if cursor:
                query["cursor"] = cursor
            r = await api.client.get(path, params=query)
            assert r.status_code == 200, r.text
            page = r.json()
            pages += 1
            assert len(page["items"]) == (3 if pages < 3 else 1)
            seen += [item["id"] for item in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert len(seen) == len(set(seen)) == 7
        # Newest first.
        assert seen == [m["id"] for m in reversed(made)]

    # A limit above the cap is capped, not refused; below 1 is refused.
    r = await api.client.get("/users", params={"limit": 100000})
    assert r.status_code == 200
    assert len(r.json()["items"]) == 7
    r = await api.client.get("/users", params={"limit": 0})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.limit"}


# ---------------------------------------------------------------- usage


def event(
    consumer_id: uuid.UUID, key_id: uuid.UUID, ts: datetime, *, route: str = "images",
    status: int = 200, latency_ms: float = 12.0, request_id: str = "",
) -> UsageEvent:
    return UsageEvent(
        ts=ts, consumer_id=consumer_id, key_id=key_id, route=route, method="GET",
        path=f"/{route}/x", status=status, upstream_latency_ms=latency_ms - 1,
        latency_ms=latency_ms, bytes_in=10, bytes_out=100, request_id=request_id or None,
        client_ip="127.0.0.1",
    )


async def record_and_wait(api: AdminApi, events: list[UsageEvent]) -> None:
    """Through the gateway's own usage recorder, as the key-auth plugin does."""
    runtime = api.gateway.runtime
    assert runtime is not None and runtime.usage is not None
    recorder = runtime.usage
    start = recorder.written
    for e in events:
        recorder.record(e)
    deadline = asyncio.get_running_loop().time() + 10
    while recorder.written < start + len(events):
        assert asyncio.get_running_loop().time() < deadline, "usage records not written"
        await asyncio.sleep(0.02)  # the recorder flushes on its own schedule


async def test_usage_of_a_key_and_of_a_user(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    k1 = await api.key(ada["id"])
    k2 = await api.key(ada["id"])
    ada_id, k1_id, k2_id = uuid.UUID(ada["id"]), uuid.UUID(k1["id"]), uuid.UUID(k2["id"])
    now = datetime.now(UTC).replace(minute=30, second=0, microsecond=0)
    hour_ago = now - timedelta(hours=1)
    events = [event(ada_id, k1_id, hour_ago, latency_ms=10, request_id=f"old{i}")
              for i in range(4)]
    events += [event(ada_id, k1_id, now, route="chat", status=500, latency_ms=400,
                     request_id="err")]
    events += [event(ada_id, k2_id, now, route="chat", request_id=f"k2-{i}") for i in range(3)]
    await record_and_wait(api, events)

    window = {"from": (now - timedelta(hours=3)).isoformat(),
              "to": (now + timedelta(hours=1)).isoformat()}
    r = await api.client.get(f"/usage/{k1['id']}", params={**window, "limit": 2})
    assert r.status_code == 200, r.text
    report = r.json()
    assert (report["key_id"], report["user_id"], report["group_by"]) == (k1["id"], ada["id"],
                                                                          "hour")
    totals = report["totals"]
    assert (totals["requests"], totals["errors"]) == (5, 1)
    assert totals["error_rate"] == pytest.approx(0.2)
    assert (totals["bytes_in"], totals["bytes_out"]) == (50, 500)
    assert totals["latency_ms_p50"] is not None and totals["latency_ms_p95"] is not None
    assert totals["latency_ms_p50"] <= totals["latency_ms_p95"]
    assert sum(p["requests"] for p in report["series"]) == 5
    assert {r["route"]: r["requests"] for r in report["top_routes"]} == {"images": 4, "chat": 1}

    # The recent raw records, newest first, paged.
    recent = report["recent"]
    assert len(recent["items"]) == 2 and recent["next_cursor"]
    assert recent["items"][0]["request_id"] == "err"
    assert recent["items"][0]["key_id"] == k1["id"] and recent["items"][0]["user_id"] == ada["id"]
    ids = [item["id"] for item in recent["items"]]
    cursor = recent["next_cursor"]
    while cursor:
        page = (await api.client.get(
            f"/usage/{k1['id']}", params={**window, "limit": 2, "cursor": cursor})).json()
        ids += [item["id"] for item in page["recent"]["items"]]
        cursor = page["recent"]["next_cursor"]
    assert len(ids) == len(set(ids)) == 5

    user = (await api.client.get("/usage", params={**window, "user_id": ada["id"]})).json()
    assert user["totals"]["requests"] == 8
    assert user["user_id"] == ada["id"] and user["key_id"] is None
    chat = (await api.client.get(
        "/usage", params={**window, "user_id": ada["id"], "route": "chat"})).json()
    assert (chat["totals"]["requests"], chat["totals"]["errors"]) == (4, 1)
    daily = (await api.client.get(
        "/usage", params={**window, "group_by": "day"})).json()
    assert daily["totals"]["requests"] == 8
    assert daily["group_by"] == "day"

    # Outside the window: nothing.
    empty = (await api.client.get(f"/usage/{k2['id']}", params={
        "from": (now - timedelta(days=3)).isoformat(),
        "to": (now - timedelta(days=2)).isoformat()})).json()
    assert empty["totals"]["requests"] == 0
    assert empty["recent"]["items"] == []


async def test_usage_parameters_are_validated(api: AdminApi) -> None:
    ada = await api.user("ada@example.com")
    key = await api.key(ada["id"])
    # Defaults: the last day, by hour.
    r = await api.client.get(f"/usage/{key['id']}")
    assert r.status_code == 200, r.text
    body = r.json()
    span = parse_time(body["end"]) - parse_time(body["start"])
    assert span == timedelta(days=1)
    assert body["totals"]["requests"] == 0

    r = await api.client.get(f"/usage/{key['id']}", params={"group_by": "week"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.group_by"}
    r = await api.client.get("/usage", params={"from": "yesterday"})
    assert fields_of(r.json()) == {"query.from"}
    r = await api.client.get("/usage", params={"from": "2025-01-02T00:00:00Z",
                                               "to": "2025-01-01T00:00:00Z"})
    assert r.status_code == 422
    assert fields_of(r.json()) == {"query.from"}
    r = await api.client.get("/usage/not-a-key")
    assert fields_of(r.json()) == {"path.key_id"}


# ---------------------------------------------------------------- invalidation


@pytest.mark.needs_redis
async def test_changes_are_published_for_every_gateway(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    from tollway.identity.invalidation import CHANNEL

    url = "redis://127.0.0.1:6379/0"
    redis = Redis.from_url(url)
    try:
        await redis.ping()
    except OSError:
        await redis.aclose()
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        async with admin_api(tmp_path, "sqlite", redis_url=url) as api:
            ada = await api.user("ada@example.com")
            key = await api.key(ada["id"])
            assert (await api.client.post("/plans", json={"name": "pro"})).status_code == 201
            expected = [
                ("PATCH", f"/keys/{key['id']}", {"status": "disabled"}, ["key", key["id"]]),
                ("POST", f"/keys/{key['id']}/rotate", None, ["key", key["id"]]),
                ("PATCH", f"/users/{ada['id']}", {"plan": "pro"}, ["consumer", ada["id"]]),
                ("DELETE", f"/keys/{key['id']}", None, ["key", key["id"]]),
            ]
            loop = asyncio.get_running_loop()
            for method, path, body, message in expected:
                if method == "POST":
                    # Rotation needs an active key.
                    await api.client.patch(f"/keys/{key['id']}", json={"status": "active"})
                r = await api.client.request(method, path, json=body)
                assert r.status_code == 200, (path, r.text)
                deadline = loop.time() + 5
                while True:
                    assert loop.time() < deadline, f"no {message} published after {method} {path}"
                    got = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if got is not None and json.loads(got["data"]) == message:
                        break
    finally:
        await pubsub.aclose()
        await redis.aclose()
