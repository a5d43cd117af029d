"""key-auth: its config, and what clients and the upstream see through a real gateway.

The gateway runs in process on its own SQLite file (its data directory); users and
keys are made with the identity functions against that database, committed and
announced, as the admin API does.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from plugin_helpers import build_ctx, envelope_of
from pydantic import ValidationError
from sqlalchemy import event, select

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream
from tollway.gateway.app import Gateway
from tollway.gateway.context import Response
from tollway.identity import consumers, keys
from tollway.identity.apikeys import generate_key
from tollway.identity.changes import pending_changes
from tollway.identity.invalidation import Announcer
from tollway.identity.resolver import KeyResolver
from tollway.plugins.key_auth import KeyAuth, KeyAuthConfig, take_query_param
from tollway.runtime import Runtime
from tollway.settings import Settings
from tollway.storage.database import Database
from tollway.storage.models import UsageRecord

# ---- config and pure helpers -----------------------------------------------------------


@pytest.mark.parametrize(
    "cfg",
    [
        {"key_in_header": False, "key_in_authorization": False, "key_in_query": False},
        {"key_names": [], "key_in_authorization": False, "key_in_query": False},
        {"key_names": ["bad header"]},
        {"key_names": ["Authorization"]},
        {"consumer_id_header": "X Bad"},
        {"consumer_id_header": "X-Who", "key_id_header": "x-who"},
        {"key_names": ["X-Key-ID"]},
        {"query_param": "api key"},
        {"realm": 'a"b'},
        {"unknown": True},
    ],
)
def test_bad_config_is_rejected(cfg: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        KeyAuthConfig.model_validate(cfg)


def test_defaults_and_priority() -> None:
    cfg = KeyAuthConfig()
    assert cfg.key_names == ("X-API-Key",)
    assert cfg.key_in_header and cfg.key_in_authorization and cfg.key_in_query
    assert cfg.query_param == "api_key" and cfg.hide_credentials
    # After CORS (2000), size limits (1900) and parameter-pollution (1800); before
    # request-transformer (801).
    assert 801 < KeyAuth.priority < 1800


@pytest.mark.parametrize(
    ("query", "value", "rest"),
    [
        (b"api_key=tw_1", b"tw_1", b""),
        (b"a=1&api_key=tw_1&b=2", b"tw_1", b"a=1&b=2"),
        (b"api_key=tw%5F1&api_key=other", b"tw_1", b""),
        (b"xapi_key=1&api_keyx=2", None, b"xapi_key=1&api_keyx=2"),
        (b"api_key&a=1", None, b"a=1"),
        (b"api_key=", b"", b""),
    ],
)
def test_take_query_param(query: bytes, value: bytes | None, rest: bytes) -> None:
    assert take_query_param(query, b"api_key") == (value, rest)


def test_without_usage_logging_there_is_no_log_hook() -> None:
    """The pipeline calls only overridden hooks: `log_usage: false` costs no log phase."""
    quiet = KeyAuth(KeyAuthConfig(log_usage=False))
    assert isinstance(quiet, KeyAuth) and not type(quiet).overrides("log")
    assert type(quiet).name == "key-auth" and type(quiet).priority == KeyAuth.priority
    assert type(KeyAuth(KeyAuthConfig())).overrides("log")


def test_without_bind_a_key_gets_503_not_a_crash() -> None:
    """`tollway check` builds plugins without a runtime; a request must never find one
    in that state, but if it did it is an envelope, not an exception."""
    plugin = KeyAuth(KeyAuthConfig())
    resp = plugin.access(build_ctx(headers=[(b"x-api-key", generate_key().encode())]))
    assert isinstance(resp, Response) and resp.status == 503
    assert envelope_of(resp)["error"]["code"] == "auth_unavailable"
    missing = plugin.access(build_ctx(request_id="rid"))
    assert isinstance(missing, Response) and missing.status == 401
    assert (b"www-authenticate", b'Bearer realm="tollway"') in missing.headers
    assert envelope_of(missing)["requestId"] == "rid"


async def test_database_down_answers_503_for_keys_not_cached(tmp_path: Path) -> None:
    dead = Database("postgresql+asyncpg://postgres@127.0.0.1:1/none")
    settings = Settings(data_dir=tmp_path)
    resolver = KeyResolver(dead, b"pepper", settings, None)
    plugin = KeyAuth(KeyAuthConfig())
    plugin.bind(Runtime(settings=settings, database=dead, pepper=b"pepper", keys=resolver))
    try:
        pending = plugin.access(build_ctx(headers=[(b"x-api-key", generate_key().encode())]))
        assert inspect.isawaitable(pending)
        resp = await pending
        assert isinstance(resp, Response) and resp.status == 503
        assert (b"retry-after", b"1") in resp.headers
        assert envelope_of(resp)["error"]["code"] == "auth_unavailable"
    finally:
        await dead.dispose()


# ---- through a running gateway ---------------------------------------------------------

ROUTES = """
  - name: other
    service: up
    paths: [/other]
  - name: public
    service: up
    paths: [/public]
    tags: [public, docs]
"""


def config(url: str, key_auth: str = "", extra_plugins: str = "", top: str = "") -> str:
    plugins = f"plugins:\n  - name: key-auth\n    config: {{{key_auth}}}\n{extra_plugins}\n"
    return api_config(url, plugins, routes=ROUTES, top=top)


@pytest.fixture
async def upstream() -> AsyncIterator[RecordingUpstream]:
    async with RecordingUpstream() as up:
        yield up


@pytest.fixture
async def gw(tmp_path: Path, upstream: RecordingUpstream) -> AsyncIterator[Gateway]:
    async with running_gateway(tmp_path, config(upstream.url)) as gateway:
        yield gateway


async def make_key(gw: Gateway, email: str = "alice@example.com", **kw: Any) -> keys.NewKey:
    assert gw.runtime is not None
    async with gw.runtime.database.sessions() as s:
        consumer, _ = await consumers.create_or_get(s, email=email)
        new = await keys.create_key(s, gw.runtime.pepper, consumer_id=consumer.id, **kw)
        await s.commit()
    return new


async def apply(gw: Gateway, fn: Any, *args: Any, **kw: Any) -> Any:
    """One identity change, committed and announced (what the admin API does)."""
    assert gw.runtime is not None
    async with gw.runtime.database.sessions() as s:
        result = await fn(s, *args, **kw)
        changes = pending_changes(s)
        await s.commit()
    await Announcer(gw.runtime.redis).announce(changes)
    return result


async def call(gw: Gateway, target: str = "/api/x", headers: str = "") -> Parsed:
    request = f"GET {target} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode()
    responses = parse_responses(await exchange_raw(gw.port, request, expect=1))
    assert len(responses) == 1
    return responses[0]


def code_of(resp: Parsed, status: int) -> str:
    assert resp.status == status, resp.body
    body = resp.json()
    assert isinstance(body, dict) and body["responseStatus"] == "error"
    code: str = body["error"]["code"]
    return code


def last(up: RecordingUpstream) -> Received:
    return up.requests[-1]


async def test_missing_key_is_401_with_a_challenge(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    resp = await call(gw)
    assert code_of(resp, 401) == "missing_api_key"
    assert resp.header("www-authenticate") == 'Bearer realm="tollway"'
    resp = await call(gw, headers="X-API-Key: \r\n")  # empty counts as missing
    assert code_of(resp, 401) == "missing_api_key"
    # A Bearer token that is not a Tollway key is not ours: still missing.
    resp = await call(gw, headers="Authorization: Bearer eyJhbGciOi.x.y\r\n")
    assert code_of(resp, 401) == "missing_api_key"
    assert upstream.requests == []


async def test_unknown_and_malformed_keys_are_401_invalid(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    real = (await make_key(gw)).raw
    typo = real[:-1] + ("0" if real[-1] != "0" else "1")
    for raw in (generate_key(), typo, "tw_live_nope", "hello"):
        resp = await call(gw, headers=f"X-API-Key: {raw}\r\n")
        assert code_of(resp, 401) == "invalid_api_key"
        assert resp.header("www-authenticate") == 'Bearer realm="tollway", error="invalid_token"'
    assert upstream.requests == []


async def test_valid_key_in_header_forwards_identity_not_the_key(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    new = await make_key(gw)
    resp = await call(gw, headers=f"X-API-Key: {new.raw}\r\n")
    assert resp.status == 200, resp.body
    seen = last(upstream)
    assert seen.header("x-api-key") is None
    assert seen.header_all("x-consumer-id") == [str(new.key.consumer_id)]
    assert seen.header_all("x-consumer-email") == ["alice@example.com"]
    assert seen.header_all("x-key-id") == [str(new.key.id)]


async def test_valid_key_as_bearer_is_removed_before_forwarding(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    new = await make_key(gw)
    resp = await call(gw, headers=f"Authorization: bearer {new.raw}\r\n")
    assert resp.status == 200, resp.body
    assert last(upstream).header("authorization") is None
    assert last(upstream).header("x-key-id") == str(new.key.id)


async def test_query_key_is_never_forwarded(gw: Gateway, upstream: RecordingUpstream) -> None:
    new = await make_key(gw)
    resp = await call(gw, f"/api/x?a=1&api_key={new.raw}&b=2")
    assert resp.status == 200, resp.body
    assert last(upstream).target == "/x?a=1&b=2"
    # Sent beside a header key, the query copy is removed as well.
    resp = await call(gw, f"/api/x?api_key={new.raw}", headers=f"X-API-Key: {new.raw}\r\n")
    assert resp.status == 200
    assert last(upstream).target == "/x"
    # A bad key in the query is refused like any other.
    resp = await call(gw, f"/api/x?api_key={generate_key()}")
    assert code_of(resp, 401) == "invalid_api_key"


async def test_spoofed_identity_headers_are_removed(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    new = await make_key(gw)
    spoof = (
        "X-Consumer-ID: 00000000-0000-0000-0000-000000000000\r\n"
        "X-Consumer-Email: admin@example.com\r\nX-Key-ID: forged\r\n"
        "X-Consumer-Username: admin\r\nX-Credential-Identifier: forged\r\n"
    )
    resp = await call(gw, headers=spoof + f"X-API-Key: {new.raw}\r\n")
    assert resp.status == 200, resp.body
    seen = last(upstream)
    assert seen.header_all("x-consumer-id") == [str(new.key.consumer_id)]
    assert seen.header_all("x-consumer-email") == ["alice@example.com"]
    assert seen.header_all("x-key-id") == [str(new.key.id)]
    assert seen.header("x-consumer-username") is None
    assert seen.header("x-credential-identifier") is None


async def test_disabled_revoked_consumer_disabled_and_expired(gw: Gateway) -> None:
    a = await make_key(gw)
    b = await make_key(gw, "bob@example.com")
    for new in (a, b):
        assert (await call(gw, headers=f"X-API-Key: {new.raw}\r\n")).status == 200
    await apply(gw, keys.update_key, a.key.id, status="disabled")
    resp = await call(gw, headers=f"X-API-Key: {a.raw}\r\n")
    assert code_of(resp, 403) == "key_disabled"
    assert resp.header("www-authenticate") is None
    await apply(gw, keys.update_key, a.key.id, status="active")
    assert (await call(gw, headers=f"X-API-Key: {a.raw}\r\n")).status == 200
    await apply(gw, keys.revoke_key, a.key.id)
    assert code_of(await call(gw, headers=f"X-API-Key: {a.raw}\r\n"), 403) == "key_disabled"
    await apply(gw, consumers.disable_consumer, b.key.consumer_id)
    assert code_of(await call(gw, headers=f"X-API-Key: {b.raw}\r\n"), 403) == "key_disabled"

    soon = await make_key(gw, "carol@example.com",
                          expires_at=datetime.now(UTC) + timedelta(seconds=1))
    assert (await call(gw, headers=f"X-API-Key: {soon.raw}\r\n")).status == 200
    # Nobody acts: the cached record answers key_expired once the instant passes.
    async with asyncio.timeout(5):
        while (resp := await call(gw, headers=f"X-API-Key: {soon.raw}\r\n")).status == 200:
            await asyncio.sleep(0.05)
    assert code_of(resp, 403) == "key_expired"


async def test_scopes_by_route_name_and_tag(gw: Gateway) -> None:
    by_name = await make_key(gw, scopes=["api"])
    by_tag = await make_key(gw, scopes=["tag:docs"])
    everywhere = await make_key(gw)
    for target, key, status in [
        ("/api/x", by_name, 200),
        ("/other/x", by_name, 403),
        ("/public/x", by_name, 403),
        ("/public/x", by_tag, 200),
        ("/api/x", by_tag, 403),
        ("/other/x", everywhere, 200),
        ("/public/x", everywhere, 200),
    ]:
        resp = await call(gw, target, headers=f"X-API-Key: {key.raw}\r\n")
        if status == 200:
            assert resp.status == 200, (target, resp.body)
        else:
            assert code_of(resp, 403) == "insufficient_scope"
            body = resp.json()
            assert isinstance(body, dict)
            assert body["error"]["details"]["route"] == target.split("/")[1]
    # A scope change reaches the cache like any other change.
    await apply(gw, keys.update_key, by_name.key.id, scopes=["api", "other"])
    assert (await call(gw, "/other/x", headers=f"X-API-Key: {by_name.raw}\r\n")).status == 200


async def test_sources_are_switchable_and_hide_credentials_off(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    cfg = (
        "key_names: [X-Token], key_in_query: false, key_in_authorization: false, "
        "hide_credentials: false, consumer_id_header: null, key_id_header: X-Tollway-Key"
    )
    async with running_gateway(tmp_path, config(upstream.url, cfg)) as gw:
        new = await make_key(gw)
        # Not read from X-API-Key, Authorization or the query any more.
        for headers, target in [
            (f"X-API-Key: {new.raw}\r\n", "/api/x"),
            (f"Authorization: Bearer {new.raw}\r\n", "/api/x"),
            ("", f"/api/x?api_key={new.raw}"),
        ]:
            assert code_of(await call(gw, target, headers), 401) == "missing_api_key"
        resp = await call(gw, headers=f"X-Token: {new.raw}\r\nX-Consumer-ID: forged\r\n")
        assert resp.status == 200, resp.body
        seen = last(upstream)
        assert seen.header("x-token") == new.raw  # hide_credentials off
        assert seen.header("x-consumer-id") is None  # not forwarded, spoof still removed
        assert seen.header("x-tollway-key") == str(new.key.id)
        assert seen.header("x-key-id") is None
        assert seen.header("x-consumer-email") == "alice@example.com"
        resp = await call(gw, headers="X-API-Key: x\r\n")
        assert resp.header("www-authenticate") == 'Key realm="tollway"'


async def test_consumer_attached_plugin_applies_after_auth(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    top = """
consumers:
  - username: alice
    id: alice@example.com
"""
    extra = """
  - name: request-transformer
    consumer: alice@example.com
    config: {add: {headers: ["X-Plan:gold"]}}
"""
    async with running_gateway(tmp_path, config(upstream.url, "", extra, top)) as gw:
        alice = await make_key(gw, "alice@example.com")
        bob = await make_key(gw, "bob@example.com")
        # Cold (the lookup is awaited) and warm (answered synchronously) alike.
        for _ in range(2):
            assert (await call(gw, headers=f"X-API-Key: {alice.raw}\r\n")).status == 200
            assert last(upstream).header("x-plan") == "gold"
            assert (await call(gw, headers=f"X-API-Key: {bob.raw}\r\n")).status == 200
            assert last(upstream).header("x-plan") is None


async def test_negative_cache_holds_back_a_flood(
    tmp_path: Path, upstream: RecordingUpstream
) -> None:
    async with running_gateway(tmp_path, config(upstream.url)) as gw:
        assert gw.runtime is not None and gw.runtime.keys is not None
        queries = [0]

        def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            if statement.lstrip().upper().startswith("SELECT") and "api_key_secrets" in statement:
                queries[0] += 1

        engine = gw.runtime.database.engine.sync_engine
        event.listen(engine, "before_cursor_execute", count)
        try:
            flood = [generate_key() for _ in range(20)]
            for _ in range(10):
                results = await asyncio.gather(
                    *(call(gw, headers=f"X-API-Key: {raw}\r\n") for raw in flood)
                )
                assert {code_of(r, 401) for r in results} == {"invalid_api_key"}
        finally:
            event.remove(engine, "before_cursor_execute", count)
        assert queries[0] == 20  # one per distinct key, not one per request
        assert gw.runtime.keys.db_lookups == 20


async def test_usage_is_recorded_for_authenticated_requests(
    gw: Gateway, upstream: RecordingUpstream
) -> None:
    assert gw.runtime is not None
    new = await make_key(gw)
    before = time.time()
    resp = await call(gw, "/api/thing?x=1", headers=f"X-API-Key: {new.raw}\r\nX-Request-ID: r1\r\n")
    assert resp.status == 200
    await call(gw, "/api/thing")  # refused: no consumer, no usage row
    await call(gw, "/api/thing", headers=f"X-API-Key: {generate_key()}\r\n")
    async with asyncio.timeout(10):
        while True:
            async with gw.runtime.database.sessions() as s:
                rows = (await s.execute(select(UsageRecord))).scalars().all()
            if rows:
                break
            await asyncio.sleep(0.05)
    assert len(rows) == 1
    row = rows[0]
    assert row.key_id == new.key.id and row.consumer_id == new.key.consumer_id
    assert row.route == "api" and row.method == "GET" and row.path == "/api/thing"
    assert row.status == 200
    assert row.bytes_out >= len(resp.body) > 0
    assert row.upstream_latency_ms is not None and 0 <= row.upstream_latency_ms <= row.latency_ms
    assert abs(row.ts.timestamp() - before) < 5
    assert row.client_ip == "127.0.0.1"
    assert row.request_id is not None


async def test_rotation_grace_then_old_secret_stops(gw: Gateway) -> None:
    created = await make_key(gw)
    rotated = await apply(gw, keys.rotate_key, gw.runtime.pepper if gw.runtime else b"",
                          created.key.id, grace=timedelta(seconds=1))
    for raw in (created.raw, rotated.raw):
        assert (await call(gw, headers=f"X-API-Key: {raw}\r\n")).status == 200
    async with asyncio.timeout(5):
        while (resp := await call(gw, headers=f"X-API-Key: {created.raw}\r\n")).status == 200:
            await asyncio.sleep(0.05)
    assert code_of(resp, 401) == "invalid_api_key"
    assert (await call(gw, headers=f"X-API-Key: {rotated.raw}\r\n")).status == 200

