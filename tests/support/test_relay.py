"""The fault relay itself, each mode against a tiny echo server."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from support.relay import FaultRelay

# How long a test waits to conclude that nothing arrives. Not a sleep that hides a
# race: "no byte within this window" is the assertion itself.
QUIET = 0.3


class EchoServer:
    """Echoes every chunk back; counts connections and how they ended."""

    def __init__(self) -> None:
        self.connections = 0
        self.resets = 0
        self.closed = 0
        self.received = 0
        self.port = 0
        self.ended = asyncio.Event()
        self._server: asyncio.Server | None = None

    async def start(self) -> EchoServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while data := await reader.read(65536):
                self.received += len(data)
                writer.write(data)
                await writer.drain()
            self.closed += 1
        except ConnectionResetError:
            self.resets += 1
        finally:
            writer.close()
            self.ended.set()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    server = await EchoServer().start()
    yield server
    await server.stop()


@pytest.fixture
async def relay(echo: EchoServer) -> AsyncIterator[FaultRelay]:
    async with FaultRelay("127.0.0.1", echo.port) as relay:
        yield relay


async def roundtrip(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes, timeout: float = 5
) -> bytes:
    writer.write(data)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(data)), timeout)


async def connect(relay: FaultRelay) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", relay.port)


async def test_pass_forwards_both_ways_and_counts(relay: FaultRelay, echo: EchoServer) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"hello") == b"hello"
    big = bytes(range(256)) * 4096  # 1 MiB: several chunks, kept in order
    assert await roundtrip(reader, writer, big) == big
    writer.close()
    await asyncio.wait_for(echo.ended.wait(), 5)

    assert relay.connections == 1
    assert relay.bytes_up == 5 + len(big)
    assert relay.bytes_down == 5 + len(big)
    assert echo.closed == 1  # the client's close reached the server as a close


async def test_delay_holds_each_direction(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    relay.delay(0.2)
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"slow") == b"slow"
    # Both directions are delayed: at least twice the delay for a round trip.
    assert time.monotonic() - started >= 0.4

    relay.passthrough()
    started = time.monotonic()
    assert await roundtrip(reader, writer, b"fast") == b"fast"
    assert time.monotonic() - started < 0.35  # not delayed (that takes 0.4 s)
    writer.close()


async def test_drop_accepts_and_stalls_new_connections(
    relay: FaultRelay, echo: EchoServer
) -> None:
    open_reader, open_writer = await connect(relay)
    assert await roundtrip(open_reader, open_writer, b"before") == b"before"

    relay.drop()
    reader, writer = await connect(relay)  # the connect itself succeeds
    writer.write(b"anyone?")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)
    assert echo.connections == 1  # never forwarded to the server
    # A connection that was already open keeps flowing.
    assert await roundtrip(open_reader, open_writer, b"still") == b"still"

    relay.passthrough()
    r2, w2 = await connect(relay)
    assert await roundtrip(r2, w2, b"back") == b"back"
    for w in (writer, open_writer, w2):
        w.close()


async def test_reset_resets_open_and_new_connections(
    relay: FaultRelay, echo: EchoServer
) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"x") == b"x"

    relay.reset()
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(1), 5)
    # The server side was reset too, not closed politely.
    await asyncio.wait_for(echo.ended.wait(), 5)
    assert echo.resets == 1

    new_reader, new_writer = await connect(relay)
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(new_reader.read(1), 5)
    new_writer.close()

    relay.passthrough()
    r2, w2 = await connect(relay)
    assert await roundtrip(r2, w2, b"again") == b"again"
    w2.close()


async def test_blackhole_stops_open_connections_and_pass_resumes(
    relay: FaultRelay, echo: EchoServer
) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"one") == b"one"

    relay.blackhole()
    writer.write(b"lost")
    await writer.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)
    assert relay.bytes_discarded == 4
    assert echo.received == 3

    # New connections are held the same way.
    r_new, w_new = await connect(relay)
    w_new.write(b"also lost")
    await w_new.drain()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(r_new.read(1), QUIET)

    relay.passthrough()
    # The same connection flows again; what was sent meanwhile stays lost.
    assert await roundtrip(reader, writer, b"two") == b"two"
    assert await roundtrip(r_new, w_new, b"three") == b"three"
    writer.close()
    w_new.close()


async def test_blackhole_holds_a_close_until_pass(relay: FaultRelay, echo: EchoServer) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"x") == b"x"
    relay.blackhole()
    writer.close()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(asyncio.shield(echo.ended.wait()), QUIET)
    assert echo.closed == 0  # a dead network forwards no FIN either

    relay.passthrough()
    await asyncio.wait_for(echo.ended.wait(), 5)
    assert echo.closed == 1


async def test_server_down_behind_the_relay_is_a_refusal() -> None:
    echo = await EchoServer().start()
    port = echo.port
    await echo.stop()
    async with FaultRelay("127.0.0.1", port) as relay:
        reader, writer = await connect(relay)
        with pytest.raises(ConnectionResetError):
            await asyncio.wait_for(reader.read(1), 5)
        writer.close()


async def test_stop_closes_everything(relay: FaultRelay) -> None:
    reader, writer = await connect(relay)
    assert await roundtrip(reader, writer, b"x") == b"x"
    assert relay.active == 1
    await relay.stop()
    assert await asyncio.wait_for(reader.read(1), 5) == b""
    assert relay.active == 0
    writer.close()
