from __future__ import annotations

import gzip
import os
import zlib

import pytest
from plugin_helpers import build_ctx, head
from pydantic import ValidationError

from tollway.gateway.context import RequestContext, ResponseHead, header_get
from tollway.plugins.base import BodyFilter
from tollway.plugins.compression import Compression, CompressionConfig, accepts_gzip

BODY = b'{"items": [' + b", ".join(b'{"id": %d, "name": "item"}' % i for i in range(500)) + b"]}"


def plugin(**cfg: object) -> Compression:
    return Compression(CompressionConfig.model_validate(cfg))


def respond(
    p: Compression,
    headers: list[tuple[bytes, bytes]],
    status: int = 200,
    method: str = "GET",
    accept: bytes | None = b"gzip, deflate, br",
) -> tuple[RequestContext, ResponseHead, BodyFilter | None]:
    req = [(b"accept-encoding", accept)] if accept is not None else []
    ctx = build_ctx(method, headers=req)
    h = head(status, headers)
    p.response_headers(ctx, h)
    return ctx, h, p.body_filter(ctx, h)


def json_headers(length: int | None = len(BODY)) -> list[tuple[bytes, bytes]]:
    hdrs = [(b"content-type", b"application/json; charset=utf-8")]
    if length is not None:
        hdrs.append((b"content-length", str(length).encode()))
    return hdrs


def test_gzip_round_trip_in_chunks() -> None:
    _, h, f = respond(plugin(), [*json_headers(), (b"etag", b'"v1"')])
    assert f is not None
    assert header_get(h.headers, b"content-encoding") == b"gzip"
    assert header_get(h.headers, b"content-length") is None
    assert header_get(h.headers, b"vary") == b"Accept-Encoding"
    assert header_get(h.headers, b"etag") == b'W/"v1"'
    out = b"".join(f.feed(BODY[i : i + 1000]) for i in range(0, len(BODY), 1000)) + f.finish()
    assert gzip.decompress(out) == BODY
    assert len(out) < len(BODY) // 4


def test_event_stream_is_flushed_per_chunk() -> None:
    _, _, f = respond(plugin(), [(b"content-type", b"text/event-stream")])
    assert f is not None
    d = zlib.decompressobj(wbits=31)
    # Each event must be readable by the client as soon as it is fed.
    for event in (b"data: one\n\n", b"data: two\n\n"):
        assert d.decompress(f.feed(event)) == event
    d.decompress(f.finish())
    assert d.eof


@pytest.mark.parametrize(
    "ctype",
    [
        b"text/html",
        b"text/plain; charset=utf-8",
        b"application/problem+json",
        b"image/svg+xml",
        b"application/atom+xml",
        b"APPLICATION/JSON",
    ],
)
def test_text_like_types_are_compressed(ctype: bytes) -> None:
    _, _, f = respond(plugin(), [(b"content-type", ctype)])
    assert f is not None


@pytest.mark.parametrize("ctype", [b"image/png", b"application/octet-stream", b"video/mp4"])
def test_binary_types_are_not_compressed_and_not_varied(ctype: bytes) -> None:
    _, h, f = respond(plugin(), [(b"content-type", ctype)])
    assert f is None
    assert h.headers == [(b"content-type", ctype)]


def test_missing_content_type_is_not_compressed() -> None:
    assert respond(plugin(), [])[2] is None


@pytest.mark.parametrize(
    "accept",
    [
        None,
        b"",
        b"identity",
        b"gzip;q=0",
        b"br, gzip;q=0.0",
        b"*;q=0",
        b"gzip;q=abc",
        b"gzip;q=2",
        b"\xff\xfe",
        b"*;q=1, gzip;q=0",
    ],
)
def test_clients_not_accepting_gzip_get_identity_with_vary(accept: bytes | None) -> None:
    _, h, f = respond(plugin(), json_headers(), accept=accept)
    assert f is None
    assert header_get(h.headers, b"content-encoding") is None
    assert header_get(h.headers, b"content-length") == str(len(BODY)).encode()
    assert header_get(h.headers, b"vary") == b"Accept-Encoding"


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (b"gzip", True),
        (b"GZIP;q=0.5", True),
        (b"x-gzip", True),
        (b"*", True),
        (b"deflate, *;q=0.1", True),
        (b"gzip ; q=1.0", True),
        (b"br", False),
    ],
)
def test_accept_encoding_parsing(value: bytes, ok: bool) -> None:
    assert accepts_gzip(value) is ok


def test_small_bodies_are_left_alone_but_unknown_lengths_are_compressed() -> None:
    assert respond(plugin(), json_headers(length=100))[2] is None
    assert respond(plugin(min_size="1k"), json_headers(length=1024))[2] is not None
    assert respond(plugin(), json_headers(length=None))[2] is not None


@pytest.mark.parametrize(
    ("status", "method", "extra"),
    [
        (204, "GET", []),
        (304, "GET", []),
        (206, "GET", [(b"content-range", b"bytes 0-99/5000")]),
        (200, "HEAD", []),
        (200, "GET", [(b"content-encoding", b"br")]),
        (200, "GET", [(b"cache-control", b"public, no-transform")]),
    ],
)
def test_responses_that_must_not_be_compressed(
    status: int, method: str, extra: list[tuple[bytes, bytes]]
) -> None:
    _, h, f = respond(plugin(), json_headers() + extra, status=status, method=method)
    assert f is None
    assert header_get(h.headers, b"content-encoding") in (None, b"br")


def test_existing_vary_and_weak_etag_are_kept() -> None:
    extra = [(b"vary", b"Origin"), (b"etag", b'W/"v2"')]
    _, h, _ = respond(plugin(), json_headers() + extra)
    assert header_get(h.headers, b"vary") == b"Origin, Accept-Encoding"
    assert header_get(h.headers, b"etag") == b'W/"v2"'


def test_level_and_random_data_round_trip() -> None:
    data = os.urandom(5000) + BODY
    _, _, f = respond(plugin(level=1), [(b"content-type", b"text/plain")])
    assert f is not None
    assert gzip.decompress(f.feed(data) + f.feed(b"") + f.finish()) == data


@pytest.mark.parametrize("cfg", [{"level": 0}, {"level": 10}, {"content_types": ["json"]}])
def test_bad_config_is_rejected(cfg: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        CompressionConfig.model_validate(cfg)


def test_gateway_made_answers_are_not_compressed() -> None:
    ctx = build_ctx(headers=[(b"accept-encoding", b"gzip")])
    h = head(403, [(b"content-type", b"application/json; charset=utf-8")], from_gateway=True)
    p = plugin(min_size=0)
    p.response_headers(ctx, h)
    assert p.body_filter(ctx, h) is None
    assert header_get(h.headers, b"content-encoding") is None
