"""What one request carries through the pipeline: the only thing plugins share.

Header lists hold (lower-case name, value) byte pairs in arrival order; names are
lower-cased once by the server so that every plugin can compare bytes directly.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tollway.gateway.errors import ERROR_CODES, GatewayError, envelope

if TYPE_CHECKING:
    from tollway.gateway.router import Route

Headers = list[tuple[bytes, bytes]]

JSON_CONTENT_TYPE = b"application/json; charset=utf-8"


def header_get(headers: Headers, name: bytes) -> bytes | None:
    """The first value of `name` (lower-case), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def header_remove(headers: Headers, name: bytes) -> None:
    """Remove every occurrence of `name` (lower-case), in place."""
    headers[:] = [(k, v) for k, v in headers if k != name]


def header_set(headers: Headers, name: bytes, value: bytes) -> None:
    """Replace every occurrence of `name` (lower-case) by one header, in place."""
    header_remove(headers, name)
    headers.append((name, value))


def header_add_vary(headers: Headers, token: bytes) -> None:
    """Add `token` to Vary unless it is already there (or Vary is `*`)."""
    want = token.lower()
    for i, (name, value) in enumerate(headers):
        if name != b"vary":
            continue
        present = {part.strip().lower() for part in value.split(b",")}
        if want in present or b"*" in present:
            return
        headers[i] = (name, value + b", " + token if value.strip() else token)
        return
    headers.append((b"vary", token))


@dataclass(slots=True)
class Response:
    """A response the gateway produces itself (an error, a CORS preflight, ...)."""

    status: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def error(
        cls,
        code: str,
        request_id: str | None,
        message: str | None = None,
        details: Any = None,
        status: int | None = None,
        headers: Headers | None = None,
    ) -> Response:
        default_status, default_message = ERROR_CODES.get(code, (500, "Error"))
        body = envelope(code, message or default_message, request_id, details)
        hdrs: Headers = [(b"content-type", JSON_CONTENT_TYPE)]
        if headers:
            hdrs.extend(headers)
        return cls(status or default_status, hdrs, body)

    @classmethod
    def from_error(cls, err: GatewayError, request_id: str | None) -> Response:
        return cls.error(
            err.code, request_id, err.message, err.details, err.status, list(err.headers)
        )


@dataclass(slots=True)
class ResponseHead:
    """Status and headers of the response on its way to the client.

    Response-phase plugins mutate it in place before it is written.
    """

    status: int
    headers: Headers
    reason: bytes = b""
    # True when Tollway made this response (error, preflight) rather than an upstream.
    from_gateway: bool = False


@dataclass(slots=True)
class RequestContext:
    """One request as the pipeline sees it."""

    method: str
    # Raw request-target path (percent-encoding kept), without the query string.
    path: str
    # Raw query string without the leading "?", or b"" when absent.
    query: bytes
    http_version: str
    headers: Headers
    # The socket peer, and the client as trusted proxies report it.
    peer_ip: str
    client_ip: str
    host: str
    scheme: str = "http"
    # The Host header as the client sent it (port included), b"" when absent.
    host_header: bytes = b""
    request_id: str | None = None
    route: Route | None = None
    # Path params captured by `{param}` route templates.
    path_params: dict[str, str] = field(default_factory=dict)
    # Set by auth plugins (later issues); the pipeline re-resolves consumer-level
    # plugin attachments when this changes.
    consumer: Any = None
    credential: Any = None
    # Largest request body this request may carry; plugins may only lower it.
    max_body_size: int = 0
    content_length: int | None = None
    chunked: bool = False
    # Headers response-phase plugins add to whatever answer goes back.
    response_headers: Headers = field(default_factory=list)
    # Free slots for plugins that must hand state from one phase to a later one.
    vars: dict[str, Any] = field(default_factory=dict)
    start: float = field(default_factory=time.perf_counter)
    started_at: float = field(default_factory=time.time)
    upstream_addr: str | None = None
    upstream_start: float = 0.0
    upstream_headers_at: float = 0.0
    finished_at: float = 0.0
    status: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    # Set when the request ended badly after headers went out (reset, timeout).
    aborted: str | None = None

    def header(self, name: bytes) -> bytes | None:
        return header_get(self.headers, name)
