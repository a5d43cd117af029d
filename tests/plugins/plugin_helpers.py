"""Builders for driving plugin hooks directly, without a server.

A plain module (not conftest.py) with a unique name, so `from plugin_helpers import`
cannot pick up another directory's conftest.
"""

from __future__ import annotations

import json
from typing import Any

from tollway.gateway.context import RequestContext, Response, ResponseHead


def build_ctx(
    method: str = "GET",
    path: str = "/v1/things",
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    client_ip: str = "203.0.113.7",
    host: str = "api.example.com",
    **extra: Any,
) -> RequestContext:
    return RequestContext(
        method=method,
        path=path,
        query=query,
        http_version="1.1",
        headers=list(headers or []),
        peer_ip=client_ip,
        client_ip=client_ip,
        host=host,
        **extra,
    )


def head(
    status: int = 200, headers: list[tuple[bytes, bytes]] | None = None, **kw: Any
) -> ResponseHead:
    return ResponseHead(status, list(headers or []), **kw)


def envelope_of(resp: Response) -> dict[str, Any]:
    """The parsed error envelope of a gateway-made response."""
    assert (b"content-type", b"application/json; charset=utf-8") in resp.headers
    body: dict[str, Any] = json.loads(resp.body)
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    return body
