"""A TCP fault relay on loopback: what toxiproxy does, inside the test process.

A test starts it between a client (the gateway, a Database) and a real server
(PostgreSQL, Redis, a RecordingUpstream), points the client at `relay.port`, and
switches the mode at any moment:

    passthrough()   bytes flow both ways (the default)
    delay(s)        every chunk, both directions, arrives `s` seconds late (latency,
                    not a bandwidth cap; order is kept)
    drop()          NEW connections are accepted but never forwarded nor answered:
                    the peer stalls (connect succeeds, nothing ever comes back).
                    Connections already open keep flowing.
    reset()         every open connection, and every new one, is reset (RST, through
                    SO_LINGER 0) on both sides
    blackhole()     nothing is forwarded on any connection, open or new: bytes are read
                    and thrown away, and a close is held back (a dead network forwards
                    no FIN either). Back to passthrough(), held closes are delivered,
                    so the server finally sees its stalled clients go; the bytes lost
                    meanwhile stay lost.

Counters: `connections` (accepted in total), `active`, `bytes_up` (client to
server, forwarded), `bytes_down` (server to client, forwarded), `bytes_discarded`.

    async with FaultRelay("127.0.0.1", 5432) as relay:
        db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{relay.port}/test")
        relay.blackhole()
        ...
        relay.passthrough()
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from typing import Any, Literal

Mode = Literal["pass", "delay", "drop", "reset", "blackhole"]

_CHUNK = 65536
# Chunks queued per direction before the reader waits: keeps backpressure (and
# memory) bounded when the receiving side is slow or delayed.
_QUEUE_CHUNKS = 64


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN: SO_LINGER on with a zero timeout, then abort."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Link:
    """One client connection and, unless dropped, its connection to the server."""

    def __init__(self, relay: FaultRelay, client: asyncio.StreamWriter) -> None:
        self.relay = relay
        self.client = client
        self.server: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.closed = False

    def reset(self) -> None:
        if self.closed:
            return
        self.closed = True
        _rst(self.client)
        if self.server is not None:
            _rst(self.server)
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.client.transport.abort()
        if self.server is not None:
            self.server.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultRelay:
    def __init__(self, target_host: str, target_port: int, host: str = "127.0.0.1") -> None:
        self.target_host = target_host
        self.target_port = target_port
        self.host = host
        self.port = 0
        self.mode: Mode = "pass"
        self.latency = 0.0
        self.connections = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.bytes_discarded = 0
        self._links: set[_Link] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._mode_changed = asyncio.Event()

    # Lifecycle ------------------------------------------------------------------

    async def start(self) -> FaultRelay:
        self._server = await asyncio.start_server(self._accept, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for link in list(self._links):
            link.close()
        self._links.clear()
        # Let the connection handlers end before the loop may, so that none of
        # them is cancelled half-way by the loop's shutdown.
        handlers = [t for t in self._handlers if not t.done()]
        if handlers:
            await asyncio.wait(handlers, timeout=5)

    async def __aenter__(self) -> FaultRelay:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    @property
    def active(self) -> int:
        return len(self._links)

    # Modes ----------------------------------------------------------------------

    def passthrough(self) -> None:
        self._set("pass")

    def delay(self, seconds: float) -> None:
        self.latency = seconds
        self._set("delay")

    def drop(self) -> None:
        self._set("drop")

    def blackhole(self) -> None:
        self._set("blackhole")

    def reset(self) -> None:
        self._set("reset")
        for link in list(self._links):
            link.reset()

    def _set(self, mode: Mode) -> None:
        self.mode = mode
        if mode != "delay":
            self.latency = 0.0
        # Wake the senders holding a close back (blackhole) so they look again.
        self._mode_changed.set()
        self._mode_changed = asyncio.Event()

    # Connections ----------------------------------------------------------------

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
            task.add_done_callback(self._handlers.discard)
        link = _Link(self, writer)
        if self.mode == "reset":
            _rst(writer)
            return
        self._links.add(link)
        try:
            if self.mode == "drop":
                await self._swallow(reader)
                return
            try:
                server_reader, server_writer = await asyncio.open_connection(
                    self.target_host, self.target_port
                )
            except OSError:
                # Nothing listens behind the relay: the client sees a refusal as RST.
                _rst(writer)
                return
            link.server = server_writer
            if link.closed:  # reset or stopped while connecting
                server_writer.transport.abort()
                return
            up = asyncio.ensure_future(self._direction(link, reader, server_writer, "up"))
            down = asyncio.ensure_future(self._direction(link, server_reader, writer, "down"))
            link.tasks = [up, down]
            await asyncio.gather(up, down, return_exceptions=True)
        finally:
            self._links.discard(link)
            link.close()

    async def _swallow(self, reader: asyncio.StreamReader) -> None:
        """drop: read and discard until the peer gives up; never answer."""
        with contextlib.suppress(OSError):
            while data := await reader.read(_CHUNK):
                self.bytes_discarded += len(data)

    async def _direction(
        self,
        link: _Link,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        direction: Literal["up", "down"],
    ) -> None:
        """One direction: a reader that stamps chunks, a sender that delivers them."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(_QUEUE_CHUNKS)
        loop = asyncio.get_running_loop()

        async def read() -> None:
            try:
                while True:
                    data = await src.read(_CHUNK)
                    # The delay is taken when the chunk arrives, so that a switch
                    # back to passthrough never lets later bytes overtake earlier ones.
                    await queue.put((loop.time() + self.latency, data))
                    if not data:
                        return
            except OSError:
                # The peer reset: mirror it to the other side.
                link.reset()

        async def send() -> None:
            while True:
                deliver_at, data = await queue.get()
                wait = deliver_at - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)  # the delay itself is what is tested
                if not data:
                    while self.mode == "blackhole":
                        await self._mode_changed.wait()
                    with contextlib.suppress(OSError):
                        if dst.can_write_eof():
                            dst.write_eof()
                    return
                if self.mode == "blackhole":
                    self.bytes_discarded += len(data)
                    continue
                dst.write(data)
                if direction == "up":
                    self.bytes_up += len(data)
                else:
                    self.bytes_down += len(data)
                try:
                    await dst.drain()
                except OSError:
                    link.reset()
                    return

        reader_task = asyncio.ensure_future(read())
        try:
            await send()
        finally:
            reader_task.cancel()
        # Half-closed one way; the link ends when both directions did.
