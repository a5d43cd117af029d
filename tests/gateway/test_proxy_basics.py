"""Smoke tests for the data plane through real sockets."""

from __future__ import annotations

from pathlib import Path

from support.client import exchange_raw, parse_responses
from support.gateway import api_config, running_gateway
from support.upstream import RecordingUpstream


def config_for(upstream: RecordingUpstream) -> str:
    return api_config(upstream.url)


async def test_get_is_proxied_and_connection_reused(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, config_for(upstream)
    ) as gw:
        data = b"GET /api/x?y=1 HTTP/1.1\r\nHost: example.com\r\n\r\n" * 3
        raw = await exchange_raw(gw.port, data, expect=3)
        responses = parse_responses(raw)
        assert [r.status for r in responses] == [200, 200, 200]
        assert [r.target for r in upstream.requests] == ["/x?y=1"] * 3
        assert upstream.connections == 1


async def test_unknown_route_gets_envelope(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, config_for(upstream)
    ) as gw:
        raw = await exchange_raw(gw.port, b"GET /nope HTTP/1.1\r\nHost: a\r\n\r\n", expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 404
        body = resp.json()
        assert isinstance(body, dict)
        request_id = body.pop("requestId")
        assert isinstance(request_id, str) and len(request_id) == 32
        assert body == {
            "responseStatus": "error",
            "message": "No route matches this request",
            "data": None,
            "error": {"code": "route_not_found", "details": None},
        }
        assert upstream.requests == []
