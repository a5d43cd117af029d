"""Review of issue 4: admin API inputs that reached the database or the datetime
arithmetic unchecked and answered 500 (or stored something else than was sent).

Every test runs on SQLite and on PostgreSQL, over real HTTP.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from admin.admin_helpers import BACKENDS, AdminApi, admin_api, assert_envelope, fields_of

JSON = {"content-type": "application/json"}


@pytest.fixture(params=BACKENDS)
async def api(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AdminApi]:
    async with admin_api(tmp_path, request.param) as running:
        yield running


async def _emails(api: AdminApi) -> list[str]:
    r = await api.client.get("/users", params={"limit": 200})
    assert r.status_code == 200, r.text
    return sorted(u["email"] for u in r.json()["items"])


async def test_nul_characters_are_a_422_not_a_500(api: AdminApi) -> None:
    # PostgreSQL text cannot hold NUL: these were 500 there (and stored on SQLite).
    for body, field in (
        (b'{"email": "nul\\u0000@example.com"}', "body.email"),
        (b'{"email": "n@example.com", "name": "a\\u0000b"}', "body.name"),
        (b'{"email": "p@example.com", "plan": "pro\\u0000"}', "body.plan"),
    ):
        r = await api.client.post("/users", content=body, headers=JSON)
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert_envelope(r.json(), "validation_error")
        assert field in fields_of(r.json()), r.text
    assert await _emails(api) == []

    user = await api.user("ok@example.com")
    r = await api.client.patch(
        f"/users/{user['id']}", content=b'{"name": "x\\u0000"}', headers=JSON
    )
    assert r.status_code == 422, r.text
    assert "body.name" in fields_of(r.json())
    r = await api.client.post(
        "/keys", content=b'{"user_id": "%s", "name": "k\\u0000"}' % user["id"].encode(),
        headers=JSON,
    )
    assert r.status_code == 422, r.text
    assert "body.name" in fields_of(r.json())
    assert (await api.client.get("/keys", params={"user_id": user["id"]})).json()["items"] == []

    # Filters: an email that cannot match is an empty page; the rest name the field.
    r = await api.client.get("/users", params={"email": "a\x00b@example.com"})
    assert (r.status_code, r.json()["items"]) == (200, []), r.text
    r = await api.client.get("/users/by-email", params={"email": "a\x00b@example.com"})
    assert r.status_code == 422, r.text
    assert "query.email" in fields_of(r.json())
    r = await api.client.get("/usage", params={"route": "a\x00"})
    assert r.status_code == 422, r.text
    assert "query.route" in fields_of(r.json())


async def test_non_finite_numbers_in_metadata_are_refused(api: AdminApi) -> None:
    # json.loads accepts NaN and Infinity: PostgreSQL refused them (500) and SQLite
    # stored them and answered null, so the user read back something else.
    for literal in (b"NaN", b"Infinity", b"-Infinity"):
        body = b'{"email": "nan@example.com", "metadata": {"a": [1, %s]}}' % literal
        r = await api.client.post("/users", content=body, headers=JSON)
        assert r.status_code == 422, (literal, r.status_code, r.text)
        assert_envelope(r.json(), "validation_error")
        assert "body.metadata" in fields_of(r.json())
    assert await _emails(api) == []
    user = await api.user("m@example.com", metadata={"a": 1})
    r = await api.client.patch(
        f"/users/{user['id']}", content=b'{"metadata": {"a": NaN}}', headers=JSON
    )
    assert r.status_code == 422, r.text
    assert (await api.client.get(f"/users/{user['id']}")).json()["metadata"] == {"a": 1}


async def test_times_at_the_edge_of_the_calendar_are_a_422(api: AdminApi) -> None:
    user = await api.user("t@example.com")
    r = await api.client.post(
        "/keys", json={"user_id": user["id"], "expires_at": "9999-12-31T23:59:59-01:00"}
    )
    assert r.status_code == 422, r.text
    assert "body.expires_at" in fields_of(r.json())
    assert (await api.client.get("/keys", params={"user_id": user["id"]})).json()["items"] == []
    for params, field in (
        ({"to": "0001-01-01T00:00:00Z"}, "query.to"),
        ({"from": "0001-01-01T00:00:00+01:00"}, "query.from"),
        ({"to": "0001-01-05T00:00:00Z", "group_by": "day"}, "query.to"),
    ):
        r = await api.client.get("/usage", params=params)
        assert r.status_code == 422, (params, r.text)
        assert_envelope(r.json(), "validation_error")
        assert field in fields_of(r.json()), r.text


async def test_an_email_in_another_unicode_form_is_the_same_user(api: AdminApi) -> None:
    composed = "jos\u00e9@example.com"  # NFC: é is one code point
    decomposed = "jose\u0301@example.com"  # NFD: e + combining acute, as macOS types it
    first = await api.client.post("/users", json={"email": composed})
    assert first.status_code == 201, first.text
    again = await api.client.post("/users", json={"email": decomposed})
    assert again.status_code == 200, again.text
    assert again.json()["id"] == first.json()["id"]
    found = await api.client.get("/users/by-email", params={"email": decomposed})
    assert found.status_code == 200 and found.json()["id"] == first.json()["id"]
    listed = await api.client.get("/users", params={"email": decomposed})
    assert [u["id"] for u in listed.json()["items"]] == [first.json()["id"]]


def _cursor(ts: str, ident: object) -> str:
    import base64
    import json

    raw = json.dumps([ts, ident]).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_a_cursor_with_an_out_of_range_time_is_a_422(api: AdminApi) -> None:
    # Decoded fine, then overflowed when converted to UTC for the query: a 500.
    some_uuid = "00000000-0000-0000-0000-000000000001"
    for path, cursor in (
        ("/users", _cursor("0001-01-01T00:00:00+01:00", some_uuid)),
        ("/keys", _cursor("9999-12-31T23:59:59-01:00", some_uuid)),
        ("/usage", _cursor("0001-01-01T00:00:00+01:00", 1)),
    ):
        r = await api.client.get(path, params={"cursor": cursor})
        assert r.status_code == 422, (path, r.status_code, r.text)
        assert_envelope(r.json(), "validation_error")
        assert "query.cursor" in fields_of(r.json()), r.text
