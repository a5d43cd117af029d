"""Request smuggling and framing strictness, from RFC 9112 §5, §6 and §11.2.

Every case sends raw bytes through the gateway to a RecordingUpstream and checks
what a client and the upstream would see: the gateway answers with the error
envelope and the right status, closes the connection, and not one byte of the
refused request reaches the upstream. Where a valid request comes first in the
same pipeline, only that one arrives.

After each refusal a sentinel request goes through the gateway on a fresh
connection to a second upstream: the gateway's upstream work is FIFO on one event
loop, so once the sentinel's answer is back anything the refused request could
have started has had its chance to reach the victim upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.client import Parsed, exchange_raw, parse_responses
from support.gateway import running_gateway
from support.upstream import RecordingUpstream

pytestmark = pytest.mark.timeout(30)

IO_TIMEOUT = 5.0


@dataclass
class Setup:
    port: int
    victim: RecordingUpstream
    sentinel: RecordingUpstream


def config_for(victim: RecordingUpstream, sentinel: RecordingUpstream) -> str:
    return f"""
services:
  - name: victim
    url: {victim.url}
  - name: sentinel
    url: {sentinel.url}
routes:
  - name: api
    service: victim
    paths: [/api]
    strip_path: false
  - name: admin
    service: victim
    paths: [/admin]
    strip_path: false
  - name: everything
    service: victim
    paths: [/]
    strip_path: false
  - name: sentinel
    service: sentinel
    hosts: [sentinel.test]
  - name: preserved
    service: victim
    hosts: [preserved.test]
    preserve_host: true
"""


@contextlib.asynccontextmanager
async def gateway(tmp_path: Path) -> AsyncIterator[Setup]:
    async with (
        RecordingUpstream() as victim,
        RecordingUpstream() as sentinel,
        running_gateway(tmp_path, config_for(victim, sentinel)) as gw,
    ):
        yield Setup(gw.port, victim, sentinel)


async def send_raw(port: int, data: bytes) -> tuple[bytes, bool]:
    """Send `data` in one write; read until the server closes. Returns (bytes, closed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = bytearray()
    closed = False
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                out += chunk
    except TimeoutError:
        closed = False
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return bytes(out), closed


async def flush_through_sentinel(setup: Setup) -> None:
    """A valid request on a fresh connection, answered by the sentinel upstream."""
    raw = await exchange_raw(
        setup.port, b"GET /ping HTTP/1.1\r\nHost: sentinel.test\r\n\r\n", expect=1
    )
    (resp,) = parse_responses(raw)
    assert resp.status == 200
    assert setup.sentinel.requests[-1].target == "/ping"


def assert_envelope(resp: Parsed, status: int, code: str) -> None:
    assert resp.status == status, resp.body
    assert resp.header("content-type") == "application/json; charset=utf-8"
    body = resp.json()
    assert isinstance(body, dict)
    assert body["responseStatus"] == "error"
    assert body["data"] is None
    assert body["error"]["code"] == code
    assert isinstance(body["message"], str) and body["message"]


# ---- the corpus --------------------------------------------------------------------

H = b"Host: h\r\n"


@dataclass(frozen=True)
class Bad:
    id: str
    raw: bytes
    status: int = 400
    code: str = "bad_request"


def post(headers: bytes, body: bytes = b"", target: bytes = b"/api", version: bytes = b"1.1"
         ) -> bytes:
    return b"POST " + target + b" HTTP/" + version + b"\r\n" + H + headers + b"\r\n" + body


CHUNKED = b"Transfer-Encoding: chunked\r\n"

BAD: list[Bad] = [
    # RFC 9112 §6.1 / §6.3 rule 3, §11.2: both framings present.
    Bad("cl-then-te", post(b"Content-Length: 6\r\n" + CHUNKED, b"0\r\n\r\nG")),
    Bad("te-then-cl", post(CHUNKED + b"Content-Length: 4\r\n",
                           b"5c\r\nGPOST /admin HTTP/1.1\r\n\r\n0\r\n\r\n")),
    Bad("te-then-cl-zero", post(CHUNKED + b"Content-Length: 0\r\n", b"0\r\n\r\n")),
    # RFC 9112 §6.3 rule 5; RFC 9110 §8.6: invalid or repeated Content-Length.
    Bad("cl-duplicate-same", post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc")),
    Bad("cl-duplicate-different",
        post(b"Content-Length: 3\r\nContent-Length: 40\r\n", b"abcGET /admin HTTP/1.1\r\n")),
    Bad("cl-list", post(b"Content-Length: 3, 3\r\n", b"abc")),
    Bad("cl-plus-sign", post(b"Content-Length: +3\r\n", b"abc")),
    Bad("cl-minus-sign", post(b"Content-Length: -3\r\n", b"abc")),
    Bad("cl-inner-space", post(b"Content-Length: 1 0\r\n", b"0123456789")),
    Bad("cl-hex", post(b"Content-Length: 0x3\r\n", b"abc")),
    Bad("cl-empty", post(b"Content-Length: \r\n", b"abc")),
    Bad("cl-letters", post(b"Content-Length: three\r\n", b"abc")),
    Bad("cl-overflow", post(b"Content-Length: 99999999999999999999\r\n", b"abc")),
    # RFC 9112 §6.3 rule 4: chunked not final in a request -> 400.
    Bad("te-chunked-gzip", post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n")),
    Bad("te-xchunked", post(b"Transfer-Encoding: xchunked\r\n", b"0\r\n\r\n")),
    Bad("te-identity", post(b"Transfer-Encoding: identity\r\n", b"abc")),
    Bad("te-gzip-only", post(b"Transfer-Encoding: gzip\r\n", b"abc")),
    Bad("te-empty", post(b"Transfer-Encoding: \r\n", b"0\r\n\r\n")),
    # RFC 9112 §7: chunked must not be applied twice (also as two field lines).
    Bad("te-chunked-twice-list",
        post(b"Transfer-Encoding: chunked, chunked\r\n", b"0\r\n\r\n")),
    Bad("te-duplicate-header", post(CHUNKED + CHUNKED, b"0\r\n\r\n")),
    Bad("te-chunked-then-gzip-lines",
        post(CHUNKED + b"Transfer-Encoding: gzip\r\n", b"0\r\n\r\n")),
    # RFC 9112 §6.1: a coding the server does not implement -> 501.
    Bad("te-gzip-chunked", post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"),
        501, "not_implemented"),
    Bad("te-gzip-then-chunked-lines",
        post(b"Transfer-Encoding: gzip\r\n" + CHUNKED, b"0\r\n\r\n")),
    # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing.
    Bad("te-in-http10", post(CHUNKED, b"3\r\nabc\r\n0\r\n\r\n", version=b"1.0")),
    Bad("te-and-cl-in-http10",
        post(CHUNKED + b"Content-Length: 3\r\n", b"abc", version=b"1.0")),
    # RFC 9112 §5 field syntax inside the framing headers.
    Bad("te-vertical-tab", post(b"Transfer-Encoding:\x0bchunked\r\n", b"0\r\n\r\n")),
    Bad("te-obs-fold", post(b"Transfer-Encoding:\r\n chunked\r\n", b"0\r\n\r\n")),
    Bad("te-space-before-colon", post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n")),
    Bad("cl-space-before-colon", post(b"Content-Length : 3\r\n", b"abc")),
    # RFC 9112 §7.1: chunk framing.
    Bad("chunk-size-not-hex", post(CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n")),
    Bad("chunk-size-negative", post(CHUNKED, b"-3\r\nabc\r\n0\r\n\r\n")),
    Bad("chunk-size-hex-prefix", post(CHUNKED, b"0x3\r\nabc\r\n0\r\n\r\n")),
    Bad("chunk-size-overflow", post(CHUNKED, b"fffffffffffffffff1\r\nabc\r\n0\r\n\r\n")),
    Bad("chunk-size-empty", post(CHUNKED, b"\r\nabc\r\n0\r\n\r\n")),
    Bad("chunk-data-no-crlf", post(CHUNKED, b"3\r\nabcX\r\n0\r\n\r\n")),
    Bad("chunk-data-too-long", post(CHUNKED, b"3\r\nabcdef\r\n0\r\n\r\n")),
    Bad("chunk-size-bare-lf", post(CHUNKED, b"3\nabc\r\n0\r\n\r\n")),
    Bad("chunk-data-bare-lf", post(CHUNKED, b"3\r\nabc\n0\r\n\r\n")),
    Bad("chunk-last-bare-lf", post(CHUNKED, b"3\r\nabc\r\n0\n\n")),
    Bad("chunk-size-bare-cr", post(CHUNKED, b"3\rabc\r\n0\r\n\r\n")),
    # RFC 9112 §2.2: bare LF / bare CR line endings.
    Bad("bare-lf-request-line", b"GET /api HTTP/1.1\n" + H + b"\r\n"),
    Bad("bare-lf-header", b"GET /api HTTP/1.1\r\nHost: h\nX: y\r\n\r\n"),
    Bad("bare-lf-end-of-head", b"GET /api HTTP/1.1\r\n" + H + b"\n"),
    Bad("all-bare-lf", b"GET /api HTTP/1.1\nHost: h\n\n"),
    Bad("bare-cr-request-line", b"GET /api HTTP/1.1\r" + H + b"\r\n"),
    Bad("bare-cr-header", b"GET /api HTTP/1.1\r\nHost: h\rX: y\r\n\r\n"),
    # RFC 9110 §5.5: CTLs in field values.
    Bad("nul-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\x00b\r\n\r\n"),
    Bad("ctl-0x01-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\x01b\r\n\r\n"),
    Bad("ctl-0x1f-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\x1fb\r\n\r\n"),
    Bad("del-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\x7fb\r\n\r\n"),
    Bad("cr-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\rb\r\n\r\n"),
    Bad("lf-in-value", b"GET /api HTTP/1.1\r\n" + H + b"X: a\nb\r\n\r\n"),
    Bad("nul-in-host", b"GET /api HTTP/1.1\r\nHost: h\x00.evil\r\n\r\n"),
    # RFC 9112 §5.1: no whitespace between field name and colon.
    Bad("space-before-colon", b"GET /api HTTP/1.1\r\nHost : h\r\n\r\n"),
    Bad("tab-before-colon", b"GET /api HTTP/1.1\r\n" + H + b"X-Foo\t: y\r\n\r\n"),
    # RFC 9112 §2.2, §5.2: whitespace-prefixed first line and obs-fold.
    Bad("ws-before-first-header", b"GET /api HTTP/1.1\r\n Host: h\r\n\r\n"),
    Bad("tab-before-first-header", b"GET /api HTTP/1.1\r\n\tX: y\r\n" + H + b"\r\n"),
    Bad("obs-fold", b"GET /api HTTP/1.1\r\n" + H + b"X: a\r\n b\r\n\r\n"),
    # RFC 9110 §5.1: field names are tokens.
    Bad("name-with-at", b"GET /api HTTP/1.1\r\n" + H + b"X@Y: 1\r\n\r\n"),
    Bad("name-with-space", b"GET /api HTTP/1.1\r\n" + H + b"X Y: 1\r\n\r\n"),
    Bad("name-with-paren", b"GET /api HTTP/1.1\r\n" + H + b"X(Y): 1\r\n\r\n"),
    Bad("name-with-nul", b"GET /api HTTP/1.1\r\n" + H + b"X\x00Y: 1\r\n\r\n"),
    Bad("name-non-ascii", b"GET /api HTTP/1.1\r\n" + H + b"X\xc3\xa9: 1\r\n\r\n"),
    Bad("name-empty", b"GET /api HTTP/1.1\r\n" + H + b": 1\r\n\r\n"),
    Bad("no-colon", b"GET /api HTTP/1.1\r\n" + H + b"NoColonHere\r\n\r\n"),
    # RFC 9112 §3.2: Host.
    Bad("http11-without-host", b"GET /api HTTP/1.1\r\n\r\n"),
    Bad("two-hosts", b"GET /api HTTP/1.1\r\nHost: h\r\nHost: sentinel.test\r\n\r\n"),
    Bad("two-hosts-http10", b"GET /api HTTP/1.0\r\nHost: h\r\nHost: h\r\n\r\n"),
    # RFC 9112 §3.2: request-target forms.
    Bad("target-with-space", b"GET /api /admin HTTP/1.1\r\n" + H + b"\r\n"),
    Bad("target-not-origin-form", b"GET api HTTP/1.1\r\n" + H + b"\r\n"),
    Bad("target-authority-form-on-get", b"GET h:80 HTTP/1.1\r\n" + H + b"\r\n"),
    Bad("target-asterisk-on-get", b"GET * HTTP/1.1\r\n" + H + b"\r\n"),
    Bad("target-with-ctl", b"GET /a\x01pi HTTP/1.1\r\n" + H + b"\r\n"),
    Bad("target-empty", b"GET  HTTP/1.1\r\n" + H + b"\r\n"),
    # RFC 9112 §2.3, RFC 9110 §15.6.6: versions.
    Bad("version-2.0", b"GET /api HTTP/2.0\r\n" + H + b"\r\n", 505, "version_not_supported"),
    Bad("version-3.0", b"GET /api HTTP/3.0\r\n" + H + b"\r\n", 505, "version_not_supported"),
    Bad("version-1.2", b"GET /api HTTP/1.2\r\n" + H + b"\r\n", 505, "version_not_supported"),
    Bad("version-lowercase", b"GET /api http/1.1\r\n" + H + b"\r\n"),
    Bad("version-garbage", b"GET /api HTTP/1.x\r\n" + H + b"\r\n"),
    Bad("version-0.9", b"GET /api\r\n\r\n", 505, "version_not_supported"),
    # RFC 9110 §9.1: methods are case-sensitive; unknown ones -> 501.
    Bad("method-lowercase", b"get /api HTTP/1.1\r\n" + H + b"\r\n", 501, "not_implemented"),
    Bad("method-unknown", b"FOO /api HTTP/1.1\r\n" + H + b"\r\n", 501, "not_implemented"),
    Bad("method-connect", b"CONNECT h:443 HTTP/1.1\r\n" + H + b"\r\n", 501, "not_implemented"),
    # RFC 9110 §10.1.1: an expectation the gateway cannot meet.
    Bad("expect-unknown", post(b"Expect: 101-upgrade\r\nContent-Length: 3\r\n", b"abc"),
        417, "expectation_failed"),
]


@pytest.mark.parametrize("case", BAD, ids=[c.id for c in BAD])
async def test_refused_and_nothing_forwarded(tmp_path: Path, case: Bad) -> None:
    async with gateway(tmp_path) as setup:
        raw, closed = await send_raw(setup.port, case.raw)
        responses = parse_responses(raw)
        assert len(responses) == 1, raw
        assert_envelope(responses[0], case.status, case.code)
        assert responses[0].header("connection") == "close"
        assert closed, "the gateway must close the connection after a refused request"
        await flush_through_sentinel(setup)
        assert setup.victim.requests == []
        assert setup.victim.bytes_received == 0


# ---- the same refusals behind a valid request in one pipeline -----------------------

PIPELINED = [c for c in BAD if c.id in {
    "cl-then-te", "te-then-cl", "cl-duplicate-different", "te-gzip-chunked",
    "chunk-size-not-hex", "bare-lf-header", "obs-fold", "two-hosts", "version-2.0",
    "method-lowercase", "nul-in-value",
}]


@pytest.mark.parametrize("case", PIPELINED, ids=[c.id for c in PIPELINED])
async def test_refused_after_valid_request_in_pipeline(tmp_path: Path, case: Bad) -> None:
    async with gateway(tmp_path) as setup:
        first = b"GET /api/first HTTP/1.1\r\n" + H + b"\r\n"
        raw, closed = await send_raw(setup.port, first + case.raw)
        responses = parse_responses(raw)
        assert [r.status for r in responses] == [200, case.status], raw
        assert json.loads(responses[0].body)["target"] == "/api/first"
        assert_envelope(responses[1], case.status, case.code)
        assert closed
        await flush_through_sentinel(setup)
        assert [r.target for r in setup.victim.requests] == ["/api/first"]
        assert setup.victim.parse_errors == 0


# ---- requests a naive parser would split: the body stays a body ---------------------

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: h\r\n\r\n"


async def test_content_length_body_holding_a_request_is_only_a_body(tmp_path: Path) -> None:
    async with gateway(tmp_path) as setup:
        data = (
            b"GET /api/x HTTP/1.1\r\n" + H
            + b"Content-Length: " + str(len(SMUGGLED)).encode() + b"\r\n\r\n" + SMUGGLED
        )
        raw = await exchange_raw(setup.port, data, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        await flush_through_sentinel(setup)
        assert [r.target for r in setup.victim.requests] == ["/api/x"]
        assert bytes(setup.victim.requests[0].body) == SMUGGLED


async def test_chunked_body_holding_a_request_is_only_a_body(tmp_path: Path) -> None:
    async with gateway(tmp_path) as setup:
        body = b"%x\r\n%b\r\n0\r\n\r\n" % (len(SMUGGLED), SMUGGLED)
        raw = await exchange_raw(setup.port, post(CHUNKED, body), expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        await flush_through_sentinel(setup)
        assert [r.target for r in setup.victim.requests] == ["/api"]
        assert bytes(setup.victim.requests[0].body) == SMUGGLED


async def test_zero_content_length_then_request_is_two_requests(tmp_path: Path) -> None:
    """The bytes after an empty body are the next request, answered in turn."""
    async with gateway(tmp_path) as setup:
        data = b"GET /api/a HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n\r\n" + (
            b"GET /api/b HTTP/1.1\r\n" + H + b"\r\n"
        )
        raw = await exchange_raw(setup.port, data, expect=2)
        assert [r.status for r in parse_responses(raw)] == [200, 200]
        assert [r.target for r in setup.victim.requests] == ["/api/a", "/api/b"]
        assert [bytes(r.body) for r in setup.victim.requests] == [b"", b""]


# ---- framing the RFC allows: accepted, and re-framed cleanly upstream ----------------

GOOD_CHUNKED = [
    # Leading and trailing whitespace is not part of a field value (RFC 9110 §5.5).
    ("te-trailing-space", b"Transfer-Encoding: chunked \r\n"),
    ("te-leading-tab", b"Transfer-Encoding:\tchunked\r\n"),
    # Transfer coding names are case-insensitive (RFC 9112 §7).
    ("te-upper-case", b"Transfer-Encoding: CHUNKED\r\n"),
    ("te-name-upper-case", b"TRANSFER-ENCODING: chunked\r\n"),
]


@pytest.mark.parametrize(("name", "header"), GOOD_CHUNKED, ids=[c[0] for c in GOOD_CHUNKED])
async def test_chunked_variants_the_rfc_allows(tmp_path: Path, name: str, header: bytes
                                               ) -> None:
    async with gateway(tmp_path) as setup:
        body = b"3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n"
        raw = await exchange_raw(setup.port, post(header, body), expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        (req,) = setup.victim.requests
        assert bytes(req.body) == b"abcdefg"
        assert req.header_all("transfer-encoding") == ["chunked"]
        assert req.header("content-length") is None


async def test_content_length_with_surrounding_whitespace_is_accepted(tmp_path: Path) -> None:
    async with gateway(tmp_path) as setup:
        raw = await exchange_raw(setup.port, post(b"Content-Length:  3 \r\n", b"abc"), expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        (req,) = setup.victim.requests
        assert bytes(req.body) == b"abc"
        assert req.header_all("content-length") == ["3"]


async def test_absolute_form_authority_wins_over_host(tmp_path: Path) -> None:
    """RFC 9112 §3.2.2: with an absolute-form target the Host header is ignored."""
    async with gateway(tmp_path) as setup:
        data = b"GET http://sentinel.test/routed HTTP/1.1\r\nHost: h\r\n\r\n"
        raw = await exchange_raw(setup.port, data, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert [r.target for r in setup.sentinel.requests] == ["/routed"]
        assert setup.victim.requests == []

        data = b"GET http://h/api/x?q=1 HTTP/1.1\r\nHost: sentinel.test\r\n\r\n"
        raw = await exchange_raw(setup.port, data, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        assert [r.target for r in setup.victim.requests] == ["/api/x?q=1"]
        assert [r.target for r in setup.sentinel.requests] == ["/routed"]


async def test_absolute_form_authority_is_the_host_the_upstream_sees(tmp_path: Path) -> None:
    """RFC 9112 §3.2.2: a proxy generates Host from the absolute-form target."""
    async with gateway(tmp_path) as setup:
        data = b"GET http://preserved.test/p HTTP/1.1\r\nHost: h\r\n\r\n"
        raw = await exchange_raw(setup.port, data, expect=1)
        (resp,) = parse_responses(raw)
        assert resp.status == 200
        (req,) = setup.victim.requests
        assert req.target == "/p"
        assert req.header_all("host") == ["preserved.test"]
        assert req.header("x-forwarded-host") == "preserved.test"
        assert "host=preserved.test" in (req.header("forwarded") or "")
