"""A refusal raised inside a parser callback keeps its answer whatever exception the
thread happens to be handling.

Raising replaces an exception's __context__ with the exception being handled at
that moment. A compiled coroutine suspended inside an except block (the Redis
limit store reloading its script after NOSCRIPT did this) leaves its exception as
the thread's current one while the loop runs other callbacks; the server used to
read the callback's refusal from __context__ and so answered 500 instead of 414.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tollway.config.loader import load_config_text
from tollway.config.snapshot import build_snapshot
from tollway.gateway.dataplane import DataPlane
from tollway.gateway.server import ClientConnection
from tollway.settings import Settings

CONFIG = """
services:
  - name: up
    url: http://127.0.0.1:9
routes:
  - name: api
    service: up
    paths: [/api]
"""


class Transport:
    def __init__(self) -> None:
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


def _answer(request: bytes, settings: Settings) -> bytes:
    plane = DataPlane(settings, build_snapshot(load_config_text(CONFIG, "test")))
    conn = ClientConnection(plane)
    transport = Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    try:
        raise LookupError("an exception some other code is still handling")
    except LookupError:
        conn.data_received(request)
    return transport.data


async def test_uri_refusal_is_414_while_another_exception_is_handled() -> None:
    data = _answer(
        b"GET /api/" + b"a" * 300 + b" HTTP/1.1\r\nHost: x\r\n\r\n", Settings(max_uri_length=100)
    )
    assert data.startswith(b"HTTP/1.1 414 "), data[:200]
    assert b'"uri_too_long"' in data


async def test_header_refusal_is_431_while_another_exception_is_handled() -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(20))
    data = _answer(
        b"GET /api/x HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", Settings(max_header_count=10)
    )
    assert data.startswith(b"HTTP/1.1 431 "), data[:200]
    assert b'"headers_too_large"' in data


def _compiled_modules() -> list[Path]:
    """The modules the Makefile compiles with mypyc (its COMPILED list)."""
    root = Path(__file__).resolve().parents[2]
    text = (root / "Makefile").read_text()
    block = text.split("COMPILED :=", 1)[1].split("\n#", 1)[0]
    names = block.replace("\\", " ").split()
    assert names and all(n.endswith(".py") for n in names), names
    return [root / "src" / n for n in names]


def test_no_compiled_coroutine_awaits_inside_an_except_block() -> None:
    """The cause above: mypyc restores the handled exception only when the except
    block ends, so a coroutine suspended inside one leaks it to the whole loop."""
    found = []
    for path in _compiled_modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ExceptHandler):
                found += [
                    f"{path.name}:{sub.lineno}"
                    for sub in ast.walk(node)
                    if isinstance(sub, ast.Await | ast.AsyncFor | ast.AsyncWith)
                ]
    assert found == []
