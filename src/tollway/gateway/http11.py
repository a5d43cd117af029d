"""HTTP/1.1 rules the data plane applies on top of llhttp: strictness, hop-by-hop
headers, path normalization, and serializing heads.

llhttp (through httptools) already refuses CL+TE, duplicate or malformed
Content-Length, bare LF/CR, control bytes in values, whitespace before the colon,
bad header tokens, obs-fold and bad chunk sizes (see tests/gateway/test_smuggling.py).
What it allows and RFC 9112 lets a proxy refuse, we refuse here.
"""

from __future__ import annotations

import time
from email.utils import formatdate
from http import HTTPStatus

from tollway.gateway.context import Headers

# RFC 9110 §7.6.1 plus the legacy ones every proxy strips.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = "0123456789abcdefABCDEF"


class RequestRejected(Exception):
    """A request the gateway refuses before routing (400/417/501/505...)."""

    def __init__(self, code: str, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status


def scan_request_headers(
    headers: Headers, http_version: str
) -> tuple[int | None, bool, bytes | None, bytes | None, bytes | None]:
    """One pass over the request headers: (content_length, chunked, host, expect,
    connection), applying the checks llhttp leaves to us.

    Raises RequestRejected for anything ambiguous: an ambiguous request is never
    forwarded (RFC 9112 §6.1, §6.3, §11.2).
    """
    hosts = 0
    host = expect = connection = None
    content_length: int | None = None
    chunked = False
    for name, value in headers:
        if name == b"host":
            hosts += 1
            host = value
        elif name == b"content-length":
            content_length = int(value)  # llhttp already refused anything but digits
        elif name == b"transfer-encoding":
            chunked = _check_transfer_encoding(value, chunked, http_version)
        elif name == b"connection":
            connection = value if connection is None else connection + b"," + value
        elif name == b"expect":
            expect = value
    if hosts > 1:
        raise RequestRejected("bad_request", "Repeated Host header")
    if http_version == "1.1" and hosts != 1:
        raise RequestRejected("bad_request", "HTTP/1.1 requests need exactly one Host header")
    return content_length, chunked, host, expect, connection


def _check_transfer_encoding(value: bytes, seen: bool, http_version: str) -> bool:
    """Accept only "chunked", once: returns True or raises RequestRejected."""
    if http_version != "1.1":
        # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means the framing is faulty.
        raise RequestRejected("bad_request", "Transfer-Encoding in an HTTP/1.0 request")
    codings = [c.strip().lower() for c in value.split(b",")]
    if seen or codings[-1] != b"chunked" or codings.count(b"chunked") != 1:
        # RFC 9112 §6.3 rule 4, §7: chunked once, and last (field lines form one list;
        # a coding after an earlier chunked line puts chunked before it).
        raise RequestRejected("bad_request", "Transfer-Encoding must end with chunked, once")
    if len(codings) > 1:
        # "gzip, chunked" is legal HTTP but a classic desync vector that no real client
        # sends: only chunked alone is implemented (RFC 9112 §6.1: 501).
        raise RequestRejected("not_implemented", "Only the chunked transfer coding is supported")
    return True


class HopFilter:
    """The set of headers not to forward: hop-by-hop ones plus what Connection names.

    Connection values repeat ("keep-alive", "close", "upgrade"), so each value's
    set is built once (bounded cache) instead of per message.
    """

    __slots__ = ("_cache", "base")

    def __init__(self, base: frozenset[bytes]) -> None:
        self.base = base
        self._cache: dict[bytes, frozenset[bytes]] = {}

    def drop(self, connection: bytes | None) -> frozenset[bytes]:
        if connection is None:
            return self.base
        found = self._cache.get(connection)
        if found is None:
            tokens = {t.strip().lower() for t in connection.split(b",")} - {b"", b"close"}
            found = self.base | tokens if tokens - self.base else self.base
            if len(self._cache) >= 256:
                self._cache.clear()
            self._cache[connection] = found
        return found


def connection_tokens(headers: Headers) -> set[bytes]:
    tokens: set[bytes] = set()
    for name, value in headers:
        if name == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return tokens


def is_upgrade(headers: Headers) -> bytes | None:
    """The Upgrade header value when Connection names upgrade, else None."""
    upgrade = None
    for name, value in headers:
        if name == b"upgrade":
            upgrade = value
    if upgrade is not None and b"upgrade" in connection_tokens(headers):
        return upgrade
    return None


def normalize_path(path: str) -> str:
    """Decode percent-encoded unreserved characters and remove dot segments.

    Routing and the upstream must see the same path: otherwise `/public/../admin`
    matches a /public route and the upstream serves /admin. Reserved characters
    (%2F above all) stay encoded, as RFC 3986 §6.2.2 says.
    """
    if "%" not in path and "/." not in path:
        return path
    if "%" in path:
        path = _decode_unreserved(path)
    if "/." not in path:
        return path
    return _remove_dot_segments(path)


def _decode_unreserved(path: str) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%" and i + 2 < n and path[i + 1] in _HEX and path[i + 2] in _HEX:
            byte = int(path[i + 1 : i + 3], 16)
            if byte in _UNRESERVED:
                out.append(chr(byte))
            else:
                out.append(path[i : i + 3].upper())
            i += 3
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 §5.2.4, on whole segments.
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == ".":
            continue
        if seg == "..":
            if out:
                out.pop()
            continue
        out.append(seg)
    trailing = segments[-1] in (".", "..")
    result = "/" + "/".join(out)
    if trailing and not result.endswith("/"):
        result += "/"
    return result


def split_target(target: bytes) -> tuple[str, bytes, str | None]:
    """Split a request-target into (path, query, authority-from-absolute-form)."""
    authority = None
    if not target.startswith(b"/"):
        lower = target[:8].lower()
        if lower.startswith(b"http://") or lower.startswith(b"https://"):
            rest = target.split(b"://", 1)[1]
            slash = rest.find(b"/")
            qmark = rest.find(b"?")
            cut = min(x for x in (slash, qmark, len(rest)) if x >= 0)
            authority = rest[:cut].decode("latin-1")
            target = rest[cut:] or b"/"
            if target.startswith(b"?"):
                target = b"/" + target
        elif target == b"*":
            return "*", b"", None
        else:
            raise RequestRejected("bad_request", "Invalid request target")
    path, _, query = target.partition(b"?")
    if b"#" in query:
        query = query.split(b"#", 1)[0]
    return path.decode("latin-1"), query, authority


def host_without_port(host: str) -> str:
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1].lower() if end > 0 else host.lower()
    return host.partition(":")[0].lower()


class DateCache:
    """The Date header value, formatted at most once a second."""

    __slots__ = ("_second", "_value")

    def __init__(self) -> None:
        self._second = 0
        self._value = b""

    def get(self) -> bytes:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True).encode()
        return self._value


DATE = DateCache()


_STATUS_LINES: dict[tuple[int, bytes], bytes] = {}


def _status_line(status: int, reason: bytes) -> bytes:
    line = _STATUS_LINES.get((status, reason))
    if line is None:
        text = reason or REASONS.get(status, b"")
        line = b"HTTP/1.1 " + str(status).encode() + b" " + text + b"\r\n"
        if len(_STATUS_LINES) < 512:  # reasons come from upstreams: keep it bounded
            _STATUS_LINES[(status, reason)] = line
    return line


def render_head(status: int, reason: bytes, headers: Headers, extra: bytes = b"") -> bytes:
    """A response head; `extra` is header lines already rendered (each ends CRLF)."""
    parts = [_status_line(status, reason)]
    for pair in headers:
        parts.append(pair[0])
        parts.append(b": ")
        parts.append(pair[1])
        parts.append(b"\r\n")
    parts.append(extra)
    parts.append(b"\r\n")
    return b"".join(parts)
