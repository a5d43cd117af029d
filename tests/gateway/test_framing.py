"""Response framing: who delimits the body, and when the connection closes."""

from __future__ import annotations

import pytest

from tollway.gateway.framing import drop_header_lines, raw_response_head, response_framing


@pytest.mark.parametrize(
    ("method", "version", "status", "length", "close", "expected"),
    [
        ("GET", "1.1", 200, 5, False, (b"content-length: 5\r\n", False, False)),
        ("GET", "1.1", 200, None, False, (b"transfer-encoding: chunked\r\n", True, False)),
        # HTTP/1.0 has no chunked coding: the close delimits the body.
        ("GET", "1.0", 200, None, False, (b"connection: close\r\n", False, True)),
        ("GET", "1.0", 200, 5, False,
         (b"content-length: 5\r\nconnection: keep-alive\r\n", False, False)),
        # No body on 204/304, and HEAD keeps the length the GET would have.
        ("GET", "1.1", 204, None, False, (b"", False, False)),
        ("GET", "1.1", 304, 10, False, (b"", False, False)),
        ("HEAD", "1.1", 200, 10, False, (b"content-length: 10\r\n", False, False)),
        ("GET", "1.1", 200, 5, True, (b"content-length: 5\r\nconnection: close\r\n", False, True)),
    ],
)
def test_response_framing(
    method: str, version: str, status: int, length: int | None, close: bool,
    expected: tuple[bytes, bool, bool],
) -> None:
    assert response_framing(method, version, status, length, close) == expected


def test_raw_head_keeps_reason_and_header_bytes_with_our_version() -> None:
    block = b"HTTP/1.0 418 Short And Stout\r\nX-Tea: Earl Grey\r\nSet-Cookie: a=1"
    head = raw_response_head(block, b"content-length: 3\r\n")
    assert head == (
        b"HTTP/1.1 418 Short And Stout\r\nX-Tea: Earl Grey\r\nSet-Cookie: a=1\r\n"
        b"content-length: 3\r\n\r\n"
    )


def test_raw_head_without_headers() -> None:
    assert raw_response_head(b"HTTP/1.1 200 OK", b"") == b"HTTP/1.1 200 OK\r\n\r\n"


HEAD = (
    b"HTTP/1.1 200 OK\r\nX-Request-Id: up\r\nAccess-Control-Allow-Origin: *\r\n"
    b"x-request-id-extra: kept\r\nACCESS-CONTROL-MAX-AGE : 5\r\nContent-Type: text/plain"
)


def test_drop_header_lines_by_name_and_by_prefix_whatever_the_case() -> None:
    assert drop_header_lines(HEAD, [b"x-request-id", b"access-control-"]) == (
        b"HTTP/1.1 200 OK\r\nx-request-id-extra: kept\r\nContent-Type: text/plain"
    )


def test_drop_header_lines_keeps_the_block_when_no_name_is_there() -> None:
    assert drop_header_lines(HEAD, [b"vary", b"x-other-"]) is HEAD
    # A name is a whole field name unless it ends in "-".
    assert drop_header_lines(HEAD, [b"content-typ"]) == HEAD
