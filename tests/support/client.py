"""Raw HTTP over a socket, for tests that must send bytes no client library would."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

import httptools


@dataclass
class Parsed:
    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    raw_body: bytearray = field(default_factory=bytearray)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def json(self) -> object:
        import json

        return json.loads(self.body)


class _Collector:
    def __init__(self) -> None:
        self.responses: list[Parsed] = []
        self._headers: list[tuple[str, str]] = []
        self._body = bytearray()
        self.parser = httptools.HttpResponseParser(self)

    def on_message_begin(self) -> None:
        self._headers = []
        self._body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.decode("latin-1").lower(), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self._body += body

    def on_message_complete(self) -> None:
        self.responses.append(
            Parsed(self.parser.get_status_code(), self._headers, bytes(self._body))
        )


def parse_responses(data: bytes, head_requests: int = 0) -> list[Parsed]:
    """Every complete response in `data`, in order (bodies de-chunked)."""
    collector = _Collector()
    # A trailing partial or malformed response ends the list; the complete ones stay.
    with contextlib.suppress(httptools.HttpParserError):
        collector.parser.feed_data(data)
    return collector.responses


async def exchange_raw(
    port: int, data: bytes, timeout: float = 5.0, expect: int | None = None
) -> bytes:
    """Send `data`, read until the server closes (or `expect` responses arrived)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    out = bytearray()
    try:
        async with asyncio.timeout(timeout):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                out += chunk
                if expect is not None and len(parse_responses(bytes(out))) >= expect:
                    break
    finally:
        writer.close()
    return bytes(out)


async def closed_by_server(reader: asyncio.StreamReader, timeout: float = 5.0) -> bool:
    """True if the server closes the connection within `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
