"""Every bundled plugin through a running gateway, and how attachments combine.

The unit tests in tests/plugins/ drive the hooks directly; these check what a client
and the upstream actually see once the data plane runs the chain.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply, echo


def config_for(url: str, plugins: str, routes: str = "", top: str = "") -> str:
    return api_config(url, f"plugins:\n{plugins}\n", routes=routes, top=top)


async def one(port: int, request: bytes) -> Parsed:
    responses = parse_responses(await exchange_raw(port, request, expect=1))
    assert len(responses) == 1
    return responses[0]


def get(path: str = "/api/x", headers: str = "") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: a\r\n{headers}\r\n".encode()


def error_code(resp: Parsed, status: int) -> str:
    assert resp.status == status, resp.body
    body = resp.json()
    assert isinstance(body, dict)
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    code: str = body["error"]["code"]
    return code


async def wait_for(check: Callable[[], bool], timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not check():
            await asyncio.sleep(0.01)


# ---- request-id ------------------------------------------------------------------------


async def test_request_id_generated_forwarded_and_echoed(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, "  - name: request-id")
    ) as gw:
        resp = await one(gw.port, get())
        rid = resp.header("x-request-id")
        assert rid is not None and re.fullmatch(r"[0-9a-f]{32}", rid)
        assert up.requests[0].header_all("x-request-id") == [rid]

        resp = await one(gw.port, get(headers="X-Request-ID: client-id.42\r\n"))
        assert resp.header("x-request-id") == "client-id.42"
        assert up.requests[1].header_all("x-request-id") == ["client-id.42"]

        # Free-form input is not trusted: replaced by a fresh id everywhere.
        resp = await one(gw.port, get(headers="X-Request-ID: <script>\r\n"))
        fresh = resp.header("x-request-id")
        assert fresh is not None and fresh != "<script>"
        assert up.requests[2].header_all("x-request-id") == [fresh]


async def test_request_id_in_gateway_errors(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, "  - name: request-id")
    ) as gw:
        resp = await one(gw.port, get("/nowhere", "X-Request-ID: trace-1\r\n"))
        assert error_code(resp, 404) == "route_not_found"
        assert resp.header("x-request-id") == "trace-1"
        body = resp.json()
        assert isinstance(body, dict) and body["requestId"] == "trace-1"


# ---- cors ------------------------------------------------------------------------------


CORS = """
  - name: cors
    config:
      origins: [https://app.example.com]
      methods: [GET, POST]
      max_age: 600
      credentials: true
"""


async def test_cors_preflight_answered_by_the_gateway(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url, CORS)) as gw:
        resp = await one(
            gw.port,
            b"OPTIONS /api/x HTTP/1.1\r\nHost: a\r\nOrigin: https://app.example.com\r\n"
            b"Access-Control-Request-Method: POST\r\n"
            b"Access-Control-Request-Headers: content-type, x-api-key\r\n\r\n",
        )
        assert resp.status == 204
        assert resp.header("access-control-allow-origin") == "https://app.example.com"
        assert resp.header("access-control-allow-methods") == "GET, POST"
        assert resp.header("access-control-allow-headers") == "content-type, x-api-key"
        assert resp.header("access-control-allow-credentials") == "true"
        assert resp.header("access-control-max-age") == "600"
        assert up.requests == []


async def test_cors_headers_on_proxied_response(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url, CORS)) as gw:
        resp = await one(gw.port, get(headers="Origin: https://app.example.com\r\n"))
        assert resp.status == 200
        assert resp.header("access-control-allow-origin") == "https://app.example.com"
        assert "Origin" in (resp.header("vary") or "")
        # An unlisted origin on a safe method passes, without CORS headers.
        resp = await one(gw.port, get(headers="Origin: https://evil.example\r\n"))
        assert resp.status == 200
        assert resp.header("access-control-allow-origin") is None
        assert len(up.requests) == 2


async def test_request_id_and_cors_replace_what_the_upstream_sent(tmp_path: Path) -> None:
    # request-id and cors edit the upstream's head without parsing it (their edits
    # are recorded in the access phase): the upstream's own X-Request-ID and CORS
    # grant must still be replaced, once, and Vary must still name Origin.
    async def handler(req: Received, reply: Reply) -> None:
        reply.send(
            200,
            [
                ("X-Request-Id", "upstream-own"),
                ("Access-Control-Allow-Origin", "*"),
                ("access-control-allow-credentials", "false"),
                ("X-Request-Id-Upstream", "kept"),
                ("Vary", "Accept-Encoding"),
            ],
            b"ok",
        )

    plugins = "  - name: request-id\n" + CORS
    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:

        def values(resp: Parsed, name: str) -> list[str]:
            return [v for k, v in resp.headers if k.lower() == name]

        def vary(resp: Parsed) -> set[str]:
            return {t.strip() for v in values(resp, "vary") for t in v.split(",")}

        resp = await one(gw.port, get(headers="X-Request-ID: trace-7\r\n"))
        assert resp.status == 200 and resp.body == b"ok"
        assert values(resp, "x-request-id") == ["trace-7"]
        assert values(resp, "x-request-id-upstream") == ["kept"]
        assert [k for k, _ in resp.headers if k.lower().startswith("access-control-")] == []
        assert vary(resp) == {"Accept-Encoding", "Origin"}

        resp = await one(gw.port, get(headers="Origin: https://app.example.com\r\n"))
        rid = values(resp, "x-request-id")
        assert len(rid) == 1 and re.fullmatch(r"[0-9a-f]{32}", rid[0])
        assert values(resp, "access-control-allow-origin") == ["https://app.example.com"]
        assert values(resp, "access-control-allow-credentials") == ["true"]
        assert vary(resp) == {"Accept-Encoding", "Origin"}
        assert len(up.requests) == 2


async def test_cors_strict_refuses_unsafe_method_from_unlisted_origin(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url, CORS)) as gw:
        resp = await one(
            gw.port,
            b"POST /api/transfer HTTP/1.1\r\nHost: a\r\nOrigin: https://evil.example\r\n"
            b"Content-Length: 2\r\n\r\n{}",
        )
        assert error_code(resp, 403) == "origin_not_allowed"
        body = resp.json()
        assert isinstance(body, dict)
        assert body["error"]["details"] == {"origin": "https://evil.example"}
        assert up.requests == []


# ---- ip-restriction and trusted-hosts ------------------------------------------------------


async def test_ip_restriction_denies_the_client(tmp_path: Path) -> None:
    plugins = "  - name: ip-restriction\n    config: {deny: [127.0.0.0/8]}"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        resp = await one(gw.port, get())
        assert error_code(resp, 403) == "ip_forbidden"
        assert up.requests == []


async def test_ip_restriction_uses_client_ip_from_trusted_proxy_only(tmp_path: Path) -> None:
    plugins = "  - name: ip-restriction\n    config: {allow: [203.0.113.0/24]}"
    xff = "X-Forwarded-For: 203.0.113.7\r\n"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins, top="trusted_proxies: [127.0.0.1/32]")
    ) as gw:
        assert (await one(gw.port, get(headers=xff))).status == 200
        assert error_code(await one(gw.port, get()), 403) == "ip_forbidden"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        # Not a trusted peer: a forged X-Forwarded-For does not get it in.
        assert error_code(await one(gw.port, get(headers=xff)), 403) == "ip_forbidden"
        assert up.requests == []


async def test_trusted_hosts(tmp_path: Path) -> None:
    plugins = "  - name: trusted-hosts\n    config: {hosts: [api.example.com, '*.example.org']}"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        ok = await one(gw.port, b"GET /api/x HTTP/1.1\r\nHost: API.example.com:8000\r\n\r\n")
        assert ok.status == 200
        ok = await one(gw.port, b"GET /api/x HTTP/1.1\r\nHost: eu.example.org\r\n\r\n")
        assert ok.status == 200
        bad = await one(gw.port, b"GET /api/x HTTP/1.1\r\nHost: evil.example\r\n\r\n")
        assert error_code(bad, 403) == "host_not_allowed"
        assert len(up.requests) == 2


# ---- request-size-limiting -----------------------------------------------------------------


SIZE = "  - name: request-size-limiting\n    config: {allowed_payload_size: 1k}"


async def test_size_limit_on_content_length(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url, SIZE)) as gw:
        resp = await one(
            gw.port,
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2000\r\n\r\n" + b"a" * 2000,
        )
        assert error_code(resp, 413) == "payload_too_large"
        assert up.requests == []
        resp = await one(
            gw.port,
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 1024\r\n\r\n" + b"a" * 1024,
        )
        assert resp.status == 200
        assert up.requests[0].body_size == 1024


async def test_size_limit_on_chunked_body(tmp_path: Path) -> None:
    async with RecordingUpstream() as up, running_gateway(tmp_path, config_for(up.url, SIZE)) as gw:
        chunks = b"".join(b"200\r\n" + b"c" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
        resp = await one(
            gw.port,
            b"POST /api/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks,
        )
        assert error_code(resp, 413) == "payload_too_large"
        assert resp.header("connection") == "close"
        # Whatever reached the upstream never became a complete request.
        assert all(not r.complete.is_set() for r in up.requests)


# ---- response side -------------------------------------------------------------------------


async def test_security_headers_on_the_response(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        reply.send(
            200,
            [("x-powered-by", "Express"), ("x-frame-options", "ALLOW-FROM https://x")],
            b"{}",
        )

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url, "  - name: security-headers")
    ) as gw:
        resp = await one(gw.port, get())
        assert resp.status == 200
        assert resp.header("x-content-type-options") == "nosniff"
        assert resp.header("strict-transport-security") == "max-age=31536000; includeSubDomains"
        assert (resp.header("content-security-policy") or "").startswith("default-src 'self'")
        assert resp.header("x-powered-by") is None
        # The upstream's own value wins without override.
        assert resp.header("x-frame-options") == "ALLOW-FROM https://x"
        # Gateway-made answers get them too.
        resp = await one(gw.port, get("/nowhere"))
        assert resp.status == 404
        assert resp.header("x-content-type-options") == "nosniff"


async def test_parameter_pollution_last(tmp_path: Path) -> None:
    plugins = "  - name: parameter-pollution\n    config: {mode: last, allow: [tag]}"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        resp = await one(gw.port, get("/api/x?role=user&tag=a&role=admin&tag=b&q=1"))
        assert resp.status == 200
        assert up.requests[0].target == "/x?tag=a&role=admin&tag=b&q=1"


async def test_parameter_pollution_reject(tmp_path: Path) -> None:
    plugins = "  - name: parameter-pollution\n    config: {mode: reject}"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        resp = await one(gw.port, get("/api/x?role=user&%72ole=admin"))
        assert error_code(resp, 400) == "parameter_pollution"
        body = resp.json()
        assert isinstance(body, dict) and body["error"]["details"]["parameter"] == "role"
        assert up.requests == []
        assert (await one(gw.port, get("/api/x?a=1&b=2"))).status == 200


async def test_response_compression(tmp_path: Path) -> None:
    payload = json.dumps({"items": [{"id": i, "name": f"item {i}"} for i in range(300)]}).encode()

    async def handler(req: Received, reply: Reply) -> None:
        reply.send(200, [("content-type", "application/json")], payload)

    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url, "  - name: response-compression")
    ) as gw:
        resp = await one(gw.port, get(headers="Accept-Encoding: br, gzip;q=0.8\r\n"))
        assert resp.status == 200
        assert resp.header("content-encoding") == "gzip"
        assert "Accept-Encoding" in (resp.header("vary") or "")
        assert len(resp.body) < len(payload)
        assert gzip.decompress(resp.body) == payload
        # The upstream was asked as usual; the gateway did the compressing.
        assert up.requests[0].header("accept-encoding") == "br, gzip;q=0.8"

        for accept in ("", "Accept-Encoding: br\r\n", "Accept-Encoding: gzip;q=0\r\n"):
            resp = await one(gw.port, get(headers=accept))
            assert resp.header("content-encoding") is None, accept
            assert resp.body == payload
            assert resp.header("content-length") == str(len(payload))


async def test_request_and_response_transformers(tmp_path: Path) -> None:
    async def handler(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        body = json.dumps({"target": req.target, "headers": req.headers}).encode()
        reply.send(200, [("x-internal", "secret"), ("x-upstream", "u1")], body)

    plugins = """
  - name: request-transformer
    config:
      remove: {headers: [x-debug], querystring: [token]}
      add: {headers: ["x-added:yes"], querystring: ["source:gw"]}
      rename: {headers: ["x-old:x-new"]}
  - name: response-transformer
    config:
      remove: {headers: [x-internal]}
      add: {headers: ["x-served-by:tollway"]}
      rename: {headers: ["x-upstream:x-backend"]}
"""
    async with RecordingUpstream(handler) as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        resp = await one(
            gw.port, get("/api/x?token=abc&keep=1", "X-Debug: 1\r\nX-Old: v\r\n")
        )
        assert resp.status == 200
        req = up.requests[0]
        assert req.target == "/x?keep=1&source=gw"
        assert req.header("x-debug") is None
        assert req.header("x-added") == "yes"
        assert req.header("x-new") == "v" and req.header("x-old") is None
        assert resp.header("x-internal") is None
        assert resp.header("x-served-by") == "tollway"
        assert resp.header("x-backend") == "u1" and resp.header("x-upstream") is None


async def test_access_log_written_to_file(tmp_path: Path) -> None:
    log_file = tmp_path / "access.log"
    plugins = f"""
  - name: request-id
  - name: access-log
    config: {{path: "{log_file}"}}
"""
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        ok = await one(gw.port, get("/api/items?secret=1", "User-Agent: probe/1\r\n"))
        missing = await one(gw.port, get("/nowhere"))

        def lines() -> list[dict[str, Any]]:
            if not log_file.exists():
                return []
            return [json.loads(line) for line in log_file.read_text().splitlines()]

        await wait_for(lambda: len(lines()) >= 2)
    first, second = lines()
    assert first["method"] == "GET"
    assert first["path"] == "/api/items"
    assert first["has_query"] is True
    assert "secret" not in json.dumps(first)
    assert first["status"] == 200
    assert first["route"] == "api"
    assert first["service"] == "up"
    assert first["upstream"] == f"127.0.0.1:{up.port}"
    assert first["request_id"] == ok.header("x-request-id")
    assert first["user_agent"] == "probe/1"
    assert first["client_ip"] == "127.0.0.1"
    assert first["bytes_out"] > 0
    assert second["status"] == 404
    assert second["route"] is None
    assert second["request_id"] == missing.header("x-request-id")


# ---- precedence ----------------------------------------------------------------------------


async def test_route_config_overrides_global_for_that_route_only(tmp_path: Path) -> None:
    routes = """
  - name: uploads
    service: up
    paths: [/uploads]
"""
    plugins = """
  - name: request-size-limiting
    config: {allowed_payload_size: 100}
  - name: request-size-limiting
    route: uploads
    config: {allowed_payload_size: 10k}
"""
    body = b"b" * 5000
    post = b"POST %b HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\n"
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins, routes)
    ) as gw:
        assert (await one(gw.port, post % b"/uploads/f" + body)).status == 200
        resp = await one(gw.port, post % b"/api/f" + body)
        assert error_code(resp, 413) == "payload_too_large"
        assert [r.target for r in up.requests] == ["/f"]


async def test_route_plugin_does_not_leak_to_other_routes(tmp_path: Path) -> None:
    routes = """
  - name: admin
    service: up
    paths: [/admin]
"""
    plugins = """
  - name: ip-restriction
    route: admin
    config: {deny: [127.0.0.1]}
"""
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins, routes)
    ) as gw:
        assert error_code(await one(gw.port, get("/admin/x")), 403) == "ip_forbidden"
        assert (await one(gw.port, get("/api/x"))).status == 200
        assert [r.target for r in up.requests] == ["/x"]


async def test_service_plugin_applies_to_its_routes(tmp_path: Path) -> None:
    async with RecordingUpstream(echo) as up:
        config = f"""
services:
  - name: internal
    url: {up.url}
  - name: public
    url: {up.url}/pub
routes:
  - name: internal-a
    service: internal
    paths: [/int-a]
  - name: internal-b
    service: internal
    paths: [/int-b]
  - name: public
    service: public
    paths: [/public]
plugins:
  - name: security-headers
    config: {{x_frame_options: DENY}}
  - name: ip-restriction
    service: internal
    config: {{allow: [10.0.0.0/8]}}
  - name: security-headers
    service: public
    config: {{x_frame_options: SAMEORIGIN}}
"""
        async with running_gateway(tmp_path, config) as gw:
            for path in ("/int-a/x", "/int-b/x"):
                resp = await one(gw.port, get(path))
                assert error_code(resp, 403) == "ip_forbidden"
                assert resp.header("x-frame-options") == "DENY"
            resp = await one(gw.port, get("/public/x"))
            assert resp.status == 200
            assert resp.header("x-frame-options") == "SAMEORIGIN"
            assert [r.target for r in up.requests] == ["/pub/x"]


async def test_client_cannot_strip_a_plugin_header_by_naming_it_in_connection(
    tmp_path: Path,
) -> None:
    """Headers named in Connection are the client's hop-by-hop ones: dropped from what
    the client sent, never from what a plugin sets for the upstream."""
    plugins = """
  - name: request-transformer
    config:
      add: {headers: ["x-gateway-verified:yes"]}
"""
    async with RecordingUpstream() as up, running_gateway(
        tmp_path, config_for(up.url, plugins)
    ) as gw:
        resp = await one(
            gw.port,
            get(headers="Connection: keep-alive, x-gateway-verified, x-hop\r\n"
                "X-Gateway-Verified: forged\r\nX-Hop: 1\r\n"),
        )
        assert resp.status == 200
        req = up.requests[0]
        assert req.header_all("x-gateway-verified") == ["yes"]
        assert req.header("x-hop") is None


async def test_gzip_does_not_starve_the_read_timeout_of_a_slow_stream(tmp_path: Path) -> None:
    """gzip may hold small chunks back; the upstream is still making progress."""

    async def trickle(req: Received, reply: Reply) -> None:
        await req.complete.wait()
        reply.head(200, [("content-type", "text/plain"), ("transfer-encoding", "chunked")])
        for _ in range(8):  # 80 bytes over ~1.6 s: longer than the 0.8 s read timeout
            reply.chunk(b"0123456789")
            await asyncio.sleep(0.2)  # the upstream's pace, not a wait for the gateway
        reply.end_chunks()

    async with RecordingUpstream(trickle) as up:
        config = f"""
services:
  - name: up
    url: {up.url}
    read_timeout: 0.8s
routes:
  - name: api
    service: up
    paths: [/api]
plugins:
  - name: response-compression
    config: {{min_size: 0}}
"""
        async with running_gateway(tmp_path, config) as gw:
            raw = await exchange_raw(
                gw.port, b"GET /api/x HTTP/1.1\r\nHost: a\r\nAccept-Encoding: gzip\r\n\r\n",
                timeout=8, expect=1,
            )
    (response,) = parse_responses(raw)
    assert response.header("content-encoding") == "gzip"
    assert gzip.decompress(response.body) == b"0123456789" * 8
