"""Serializing heads on the proxy path: the upstream request, the client response.

Pure functions of their inputs, so the exchange keeps the state machine and this
module the byte layout (RFC 9112 §6: who frames a body, and how).
"""

from __future__ import annotations

from tollway.config.schema import HTTP_METHODS
from tollway.gateway.context import RequestContext
from tollway.gateway.forwarded import FORWARDING_HEADERS, forwarding_block
from tollway.gateway.http11 import HOP_BY_HOP, HopFilter

# Headers the upstream request never carries from the client as they are.
UPSTREAM_HOPS = HopFilter(HOP_BY_HOP | FORWARDING_HEADERS | {b"host", b"content-length", b"expect"})
DOWNSTREAM_HOPS = HopFilter(HOP_BY_HOP | {b"content-length"})
NO_BODY_STATUS = frozenset({204, 304})
_METHOD_BYTES = {m: m.encode() for m in HTTP_METHODS}


def request_head(
    ctx: RequestContext,
    upstream_path: str,
    host: bytes,
    upgrade: bytes | None,
    trusted_peer: bool,
    local_port: int,
) -> bytes:
    """The request head for the upstream: the client's end-to-end headers, ours for
    forwarding, and framing from what the client declared (the body is re-framed
    only when it was chunked). Headers the client's Connection named were removed
    from ctx.headers before the plugins ran."""
    parts = [_METHOD_BYTES.get(ctx.method) or ctx.method.encode(), b" ",
             upstream_path.encode("latin-1")]
    if ctx.query:
        parts += (b"?", ctx.query)
    parts += (b" HTTP/1.1\r\nhost: ", host, b"\r\n")
    drop = UPSTREAM_HOPS.base
    for name, value in ctx.headers:
        if name not in drop:
            parts += (name, b": ", value, b"\r\n")
    parts.append(forwarding_block(
        ctx.headers, ctx.peer_ip, ctx.host_header or ctx.host.encode(), local_port,
        trusted_peer,
    ))
    if upgrade is not None:
        parts += (b"connection: upgrade\r\nupgrade: ", upgrade, b"\r\n")
    if ctx.content_length is not None:
        parts += (b"content-length: ", str(ctx.content_length).encode(), b"\r\n")
    elif ctx.chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


def response_framing(
    method: str, http_version: str, status: int, content_length: int | None, close: bool
) -> tuple[bytes, bool, bool]:
    """(header lines, chunked, close) for a response to the client.

    The lines (each ending CRLF) carry the framing and the Connection header.
    `close` in: the connection must close after this response; out: it will.
    """
    chunked = False
    if method == "HEAD" or status in NO_BODY_STATUS or status < 200:
        lines = b""
        if method == "HEAD" and content_length is not None:
            lines = b"content-length: %d\r\n" % content_length
    elif content_length is not None:
        lines = b"content-length: %d\r\n" % content_length
    elif http_version == "1.1":
        lines = b"transfer-encoding: chunked\r\n"
        chunked = True
    else:
        lines = b""
        close = True  # HTTP/1.0: the close delimits the body
    if close:
        lines += b"connection: close\r\n"
    elif http_version == "1.0":
        lines += b"connection: keep-alive\r\n"
    return lines, chunked, close


def drop_header_lines(block: bytes, names: list[bytes]) -> bytes:
    """`block` (a status line and header lines, no final CRLF) without the lines of
    `names` (lower-case; a name ending in "-" drops every name it starts)."""
    low = block.lower()
    for name in names:
        if _at_line_start(low, name):
            break
    else:
        return block  # the usual case: none of them is there
    lines = block.split(b"\r\n")
    kept = [lines[0]]
    for line in lines[1:]:
        if not _named(line.partition(b":")[0].strip().lower(), names):
            kept.append(line)
    return b"\r\n".join(kept)


def _at_line_start(low: bytes, name: bytes) -> bool:
    # find() and a look at the two bytes before, rather than a search for
    # CRLF + name, which would build that needle on every request.
    i = low.find(name, 2)
    while i >= 0:
        if low[i - 1] == 10 and low[i - 2] == 13:
            return True
        i = low.find(name, i + 1)
    return False


def _named(field: bytes, names: list[bytes]) -> bool:
    # The slow path (a name to drop is there): a generator is fine here.
    return any(field == name or (name.endswith(b"-") and field.startswith(name)) for name in names)


def raw_response_head(block: bytes, framing: bytes, extra: bytes = b"") -> bytes:
    """The upstream's head (status line and headers, hop-by-hop lines already cut)
    with our status-line version and framing: its reason and headers byte for byte.
    `extra`: header lines the gateway adds (each ends CRLF)."""
    eol = block.find(b"\r\n")
    if eol < 0:
        eol = len(block)
    return b"".join(
        (
            b"HTTP/1.1", block[block.find(b" "):eol], block[eol:], b"\r\n",
            extra, framing, b"\r\n",
        )
    )  # fmt: skip
