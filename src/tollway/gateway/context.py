"""What one request carries through the pipeline: the only thing plugins share.

Header lists hold (lower-case name, value) byte pairs in arrival order; names are
lower-cased once by the server so that every plugin can compare bytes directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from dataclasses import dataclass
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
    for pair in headers:
        if pair[0] == name:
            # Rebuilt only when the name is there (mostly it is not), keeping the
            # pairs themselves.
            headers[:] = [h for h in headers if h[0] != name]
            return


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


# The per-request records below spell out __init__ (init=False): mypyc compiles a
# written __init__ natively, where the one @dataclass generates runs as interpreted
# Python (about 1 µs for RequestContext's 33 fields, on every request).


@dataclass(slots=True, init=False)
class Response:
    """A response the gateway produces itself (an error, a CORS preflight, ...)."""

    status: int
    headers: Headers
    body: bytes
    # The error code of an enveloped error (error()), "" for any other response:
    # what tollway_gateway_errors_total counts.
    code: str

    def __init__(
        self, status: int, headers: Headers | None = None, body: bytes = b"", code: str = ""
    ) -> None:
        self.status = status
        self.headers = [] if headers is None else headers
        self.body = body
        self.code = code

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
        return cls(status or default_status, hdrs, body, code)

    @classmethod
    def from_error(cls, err: GatewayError, request_id: str | None) -> Response:
        return cls.error(
            err.code, request_id, err.message, err.details, err.status, list(err.headers)
        )


class Deferred:
    """An access hook's answer that waits on one future: a compiled hook's way to
    wait without a task.

    The data plane adds a done-callback to `future` and then calls resolve(), which
    reads the future (its result or its failure) and answers like an access hook:
    None to go on, a Response, or another Deferred or awaitable to wait on. Compared
    with returning a coroutine, this saves the task (and asyncio's registration of
    it in a WeakSet, interpreted) and one coroutine frame per layer between the
    hook and the future. Subclasses live in compiled modules (a native class);
    a plugin in plain Python returns an awaitable instead.
    """

    def __init__(self, future: asyncio.Future[Any]) -> None:
        self.future = future

    def resolve(self) -> AccessResult:
        """Called once `future` is done (never before)."""
        raise NotImplementedError


# What an access hook returns (see gateway/pipeline.py).
AccessResult = Response | Deferred | Awaitable[Response | None] | None


@dataclass(slots=True, init=False)
class ResponseHead:
    """Status and headers of the response on its way to the client.

    Response-phase plugins mutate it in place before it is written.
    """

    status: int
    headers: Headers
    reason: bytes
    # True when Tollway made this response (error, preflight) rather than an upstream.
    from_gateway: bool

    def __init__(
        self, status: int, headers: Headers, reason: bytes = b"", from_gateway: bool = False
    ) -> None:
        self.status = status
        self.headers = headers
        self.reason = reason
        self.from_gateway = from_gateway


@dataclass(slots=True, init=False)
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
    scheme: str
    # The Host header as the client sent it (port included), b"" when absent.
    host_header: bytes
    request_id: str | None
    route: Route | None
    # Path params captured by `{param}` route templates.
    path_params: dict[str, str]
    # Set by auth plugins (later issues); the pipeline re-resolves consumer-level
    # plugin attachments when this changes.
    consumer: Any
    credential: Any
    # Largest request body this request may carry; plugins may only lower it.
    max_body_size: int
    content_length: int | None
    chunked: bool
    # Headers response-phase plugins add to whatever answer goes back.
    response_headers: Headers
    # A raw-safe plugin's response edits as data (plugins/base.py `raw_response`):
    # applied only when the upstream's head goes out as bytes, where its response
    # hook does not run. raw_drop: lower-case names whose lines are cut from the
    # upstream's head (a name ending in "-" cuts every name it starts); then the
    # raw_headers lines are appended. None until a plugin adds one.
    raw_drop: list[bytes] | None
    raw_headers: Headers | None
    # Free slots for plugins that must hand state from one phase to a later one.
    vars: dict[str, Any]
    start: float
    started_at: float
    upstream_addr: str | None
    upstream_start: float
    upstream_headers_at: float
    finished_at: float
    status: int
    bytes_in: int
    bytes_out: int
    # Set when the request ended badly after headers went out (reset, timeout).
    aborted: str | None

    def __init__(
        self,
        method: str,
        path: str,
        query: bytes,
        http_version: str,
        headers: Headers,
        peer_ip: str,
        client_ip: str,
        host: str,
        scheme: str = "http",
        host_header: bytes = b"",
        request_id: str | None = None,
        route: Route | None = None,
        path_params: dict[str, str] | None = None,
        consumer: Any = None,
        credential: Any = None,
        max_body_size: int = 0,
        content_length: int | None = None,
        chunked: bool = False,
        response_headers: Headers | None = None,
        vars: dict[str, Any] | None = None,
        start: float | None = None,
        started_at: float | None = None,
        upstream_addr: str | None = None,
        upstream_start: float = 0.0,
        upstream_headers_at: float = 0.0,
        finished_at: float = 0.0,
        status: int = 0,
        bytes_in: int = 0,
        bytes_out: int = 0,
        aborted: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.http_version = http_version
        self.headers = headers
        self.peer_ip = peer_ip
        self.client_ip = client_ip
        self.host = host
        self.scheme = scheme
        self.host_header = host_header
        self.request_id = request_id
        self.route = route
        self.path_params = {} if path_params is None else path_params
        self.consumer = consumer
        self.credential = credential
        self.max_body_size = max_body_size
        self.content_length = content_length
        self.chunked = chunked
        self.response_headers = [] if response_headers is None else response_headers
        self.raw_drop = None
        self.raw_headers = None
        self.vars = {} if vars is None else vars
        self.start = time.perf_counter() if start is None else start
        self.started_at = time.time() if started_at is None else started_at
        self.upstream_addr = upstream_addr
        self.upstream_start = upstream_start
        self.upstream_headers_at = upstream_headers_at
        self.finished_at = finished_at
        self.status = status
        self.bytes_in = bytes_in
        self.bytes_out = bytes_out
        self.aborted = aborted

    def header(self, name: bytes) -> bytes | None:
        return header_get(self.headers, name)

    def raw_edit(self, drop: bytes, name: bytes, value: bytes) -> None:
        """For the raw path: cut `drop`'s lines (b"" for none), then add one line."""
        if drop:
            if self.raw_drop is None:
                self.raw_drop = [drop]
            else:
                self.raw_drop.append(drop)
        if name:
            if self.raw_headers is None:
                self.raw_headers = [(name, value)]
            else:
                self.raw_headers.append((name, value))
