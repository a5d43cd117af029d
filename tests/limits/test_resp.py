"""The hand-written RESP2 client (limits/resp.py): parser, encoding, URLs, and the
connection against real Redis servers.

Parser tests feed replies cut at every byte boundary. Pipelining is checked with
1000 concurrent calls on the shared Redis (own key prefix, deleted afterwards).
Timeouts, crashes and AUTH/SELECT run on private redis-servers started here and
stopped or killed by their own pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from support.gateway import free_port
from support.redis_server import PrivateRedis
from tollway.limits.resp import (
    NoScriptError,
    Parser,
    RespClient,
    RespConnectionError,
    RespError,
    RespProtocolError,
    RespTimeoutError,
    encode_command,
)

REDIS_URL = "redis://127.0.0.1:6379/0"


# -- a reference encoder for replies (what a server sends) ----------------------------


def encode_reply(value: Any) -> bytes:
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, RespError):
        return b"-" + value.message.encode() + b"\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, bytes):
        return b"$%d\r\n%b\r\n" % (len(value), value)
    if isinstance(value, list):
        return b"*%d\r\n" % len(value) + b"".join(encode_reply(v) for v in value)
    raise TypeError(value)


def same(got: Any, want: Any) -> bool:
    """Equality where error values compare by class and message."""
    if isinstance(want, RespError):
        return type(got) is type(want) and got.message == want.message
    if isinstance(want, list):
        return (
            isinstance(got, list)
            and len(got) == len(want)
            and all(same(g, w) for g, w in zip(got, want, strict=True))
        )
    return type(got) is type(want) and bool(got == want)


def check_reply(got: list[Any], want: list[Any]) -> None:
    assert len(got) == len(want), (got, want)
    for g, w in zip(got, want, strict=True):
        assert same(g, w), (g, w)


CHECK_LIKE = [1, *[b"1", b"1000000000", b"999999999", b"0.001", b"0", b"17e8", b"0", b"0"] * 3]
REPLIES: list[tuple[bytes, Any]] = [
    (b"+OK\r\n", b"OK"),
    (b"+\r\n", b""),
    (b"-ERR wrong number of arguments\r\n", RespError("ERR wrong number of arguments")),
    (b"-NOSCRIPT No matching script.\r\n", NoScriptError("NOSCRIPT No matching script.")),
    (b":0\r\n", 0),
    (b":-42\r\n", -42),
    (b":9223372036854775807\r\n", 9223372036854775807),
    (b"$5\r\nhello\r\n", b"hello"),
    (b"$0\r\n\r\n", b""),
    (b"$-1\r\n", None),
    (b"$4\r\na\r\nb\r\n", b"a\r\nb"),  # CRLF inside a bulk string
    (b"$2\r\n\r\n\r\n", b"\r\n"),
    (b"$3\r\nab\r\r\n", b"ab\r"),
    (b"$3\r\n\nab\r\n", b"\nab"),
    (b"*0\r\n", []),
    (b"*-1\r\n", None),
    (encode_reply(CHECK_LIKE), CHECK_LIKE),  # the fast path after a leading integer
    (encode_reply([b"x" * 2000, b"y"]), [b"x" * 2000, b"y"]),  # too long for the fast path
    (encode_reply([b"a", 1, b"b", None]), [b"a", 1, b"b", None]),  # fast path refused
    (encode_reply([b"a\r\nb", b"c"]), [b"a\r\nb", b"c"]),
    (
        b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n*1\r\n$-1\r\n-ERR inner\r\n",
        [1, [b"x", [None]], RespError("ERR inner")],
    ),
    (b"*2\r\n*-1\r\n*0\r\n", [None, []]),
]
STREAM = b"".join(raw for raw, _ in REPLIES)
EXPECTED = [value for _, value in REPLIES]


# -- parser -----------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "want"), REPLIES, ids=[repr(r)[:40] for r, _ in REPLIES])
def test_each_reply_parses_whole(raw: bytes, want: Any) -> None:
    parser = Parser()
    check_reply(parser.feed(raw), [want])
    assert parser.buffered == 0


def test_every_reply_at_every_byte_boundary() -> None:
    for raw, want in REPLIES:
        for cut in range(len(raw) + 1):
            parser = Parser()
            got = parser.feed(raw[:cut])
            if cut < len(raw):
                assert got == [], (raw, cut)
            got += parser.feed(raw[cut:])
            check_reply(got, [want])
            assert parser.buffered == 0


def test_a_stream_cut_anywhere_and_fed_byte_by_byte() -> None:
    for cut in range(len(STREAM) + 1):
        parser = Parser()
        got = parser.feed(STREAM[:cut]) + parser.feed(STREAM[cut:])
        check_reply(got, EXPECTED)
    parser = Parser()
    got = []
    for i in range(len(STREAM)):
        got += parser.feed(STREAM[i : i + 1])
    check_reply(got, EXPECTED)


replies = st.recursive(
    st.none()
    | st.integers(-(2**63), 2**63 - 1)
    | st.binary(max_size=30)
    | st.sampled_from([b"\r\n", b"\r", b"\n", b"a\r\nb\r\n"])
    | st.sampled_from(["ERR x", "NOSCRIPT y", "WRONGTYPE z"]).map(RespError.of),
    lambda inner: st.lists(inner, max_size=6),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(replies, min_size=1, max_size=5), st.data())
def test_any_replies_cut_into_any_chunks(values: list[Any], data: st.DataObject) -> None:
    stream = b"".join(encode_reply(v) for v in values)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parser = Parser()
    got: list[Any] = []
    last = 0
    for cut in [*cuts, len(stream)]:
        got += parser.feed(stream[last:cut])
        last = cut
    check_reply(got, values)
    assert parser.buffered == 0


@pytest.mark.parametrize(
    "raw",
    [b"?what\r\n", b"$abc\r\nx\r\n", b":12x\r\n", b"*z\r\n", b"\r\n", b"$3\r\nabcd\r\n"],
)
def test_bytes_that_are_not_resp_raise_a_protocol_error(raw: bytes) -> None:
    with pytest.raises(RespProtocolError):
        Parser().feed(raw)


def test_error_replies_carry_their_message() -> None:
    (noscript,) = Parser().feed(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
    assert isinstance(noscript, NoScriptError) and isinstance(noscript, RespError)
    assert noscript.message == "NOSCRIPT No matching script. Please use EVAL."
    (other,) = Parser().feed(b"-WRONGTYPE Operation against a key\r\n")
    assert type(other) is RespError and "WRONGTYPE" in str(other)


# -- encoding and URLs ---------------------------------------------------------------------


def test_commands_encode_as_arrays_of_bulk_strings() -> None:
    assert encode_command(("EVALSHA", b"ab", 2, -1, "é")) == (
        b"*5\r\n$7\r\nEVALSHA\r\n$2\r\nab\r\n$1\r\n2\r\n$2\r\n-1\r\n$2\r\n\xc3\xa9\r\n"
    )
    assert encode_command(("PING",)) == b"*1\r\n$4\r\nPING\r\n"
    assert encode_command(("SET", "k", b"")) == b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"


def test_urls() -> None:
    plain = RespClient.from_url("redis://10.0.0.5:7000/3", timeout=0.5)
    assert (plain.host, plain.port, plain.db, plain.password, plain.timeout) == (
        "10.0.0.5", 7000, 3, None, 0.5,
    )  # fmt: skip
    assert plain.connect_timeout == 0.5
    default = RespClient.from_url("redis://localhost")
    assert (default.host, default.port, default.db) == ("localhost", 6379, 0)
    auth = RespClient.from_url("redis://:p%40ss@h:1/0")
    assert (auth.username, auth.password) == (None, "p@ss")
    user = RespClient.from_url("redis://bob:pw@h/2")
    assert (user.username, user.password, user.db) == ("bob", "pw", 2)
    for bad in ("rediss://h:1/0", "unix:///tmp/redis.sock", "redis://h/x"):
        with pytest.raises(ValueError):
            RespClient.from_url(bad)


# -- against the shared Redis --------------------------------------------------------------


@pytest.fixture
async def shared() -> AsyncIterator[tuple[RespClient, str]]:
    """A client of the shared Redis and a key prefix of this test only."""
    client = RespClient.from_url(REDIS_URL, timeout=2.0)
    prefix = f"test:tollway:resp:{uuid.uuid4().hex}:"
    try:
        yield client, prefix
    finally:
        cursor = b"0"
        while True:
            reply = await client.call("SCAN", cursor, "MATCH", prefix + "*", "COUNT", 1000)
            assert isinstance(reply, list)
            cursor, keys = reply
            if keys:
                await client.call("DEL", *keys)
            if cursor == b"0":
                break
        await client.aclose()


@pytest.mark.needs_redis
async def test_1000_concurrent_calls_get_their_own_replies(
    shared: tuple[RespClient, str],
) -> None:
    client, prefix = shared
    first_id = await client.call("CLIENT", "ID")

    async def one(i: int) -> None:
        key = f"{prefix}{i}"
        set_, echo, incr, get = await asyncio.gather(
            client.call("SET", key, f"v{i}"),
            client.call("ECHO", f"echo-{i}"),
            client.call("INCRBY", f"{key}:n", i),
            client.call("GET", key),
        )
        assert (set_, echo, incr, get) == (b"OK", f"echo-{i}".encode(), i, f"v{i}".encode())

    await asyncio.gather(*(one(i) for i in range(1000)))
    # Everything went over the one connection it had before (pipelined, no reconnect).
    assert await client.call("CLIENT", "ID") == first_id


@pytest.mark.needs_redis
async def test_error_replies_raise_and_keep_the_connection(
    shared: tuple[RespClient, str],
) -> None:
    client, prefix = shared
    await client.call("SET", prefix + "s", "text")
    first_id = await client.call("CLIENT", "ID")
    results = await asyncio.gather(
        client.call("INCR", prefix + "s"),
        client.call("EVALSHA", "0" * 40, 0),
        client.call("ECHO", "after"),
        return_exceptions=True,
    )
    assert type(results[0]) is RespError and "not an integer" in results[0].message
    assert isinstance(results[1], NoScriptError)
    assert results[2] == b"after"
    assert await client.call("CLIENT", "ID") == first_id  # an error reply is no failure


@pytest.mark.needs_redis
async def test_nested_replies_from_a_script(shared: tuple[RespClient, str]) -> None:
    client, _ = shared
    script = "return {1, {2, 'x', {}}, false, 'y', redis.error_reply('ERR in')}"
    got = await client.call("EVAL", script, 0)
    assert isinstance(got, list)
    check_reply(got, [1, [2, b"x", []], None, b"y", RespError("ERR in")])


@pytest.mark.needs_redis
async def test_a_cancelled_caller_does_not_shift_the_replies(
    shared: tuple[RespClient, str],
) -> None:
    client, _ = shared
    await client.call("PING")
    task = asyncio.get_running_loop().create_task(client.call("ECHO", "cancelled"))
    await asyncio.sleep(0)  # let it send, then give up on it
    task.cancel()
    assert await client.call("ECHO", "mine") == b"mine"
    assert task.cancelled()


# -- private servers -----------------------------------------------------------------------


@contextlib.contextmanager
def started(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis").start()
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)  # a stopped server, to be killed
        server.kill()


@pytest.mark.needs_redis
async def test_a_stopped_server_times_out_every_pending_call_then_reconnects(
    tmp_path: Path,
) -> None:
    with started(tmp_path) as server:
        assert server.proc is not None
        client = RespClient.from_url(server.url, timeout=0.3)
        try:
            first_id = await client.call("CLIENT", "ID")
            os.kill(server.proc.pid, signal.SIGSTOP)  # our own private server
            began = time.monotonic()
            results = await asyncio.gather(
                *(client.call("ECHO", f"lost-{i}") for i in range(20)), return_exceptions=True
            )
            elapsed = time.monotonic() - began
            assert all(isinstance(r, RespTimeoutError) for r in results), results
            assert "0.3 s" in str(results[0])
            assert 0.25 < elapsed < 1.0
            assert not client.connected  # dropped: late replies would be misaligned
            os.kill(server.proc.pid, signal.SIGCONT)
            # A fresh connection; the stopped one's late replies never reach it.
            assert await client.call("ECHO", "fresh") == b"fresh"
            assert await client.call("CLIENT", "ID") != first_id
        finally:
            await client.aclose()


@pytest.mark.needs_redis
async def test_a_killed_server_fails_pending_calls_at_once_and_a_restart_is_found(
    tmp_path: Path,
) -> None:
    with started(tmp_path) as server:
        client = RespClient.from_url(server.url, timeout=5.0)
        try:
            assert await client.call("PING") == b"PONG"
            # A call still waiting (BLPOP blocks server-side) when the server dies.
            waiting = asyncio.get_running_loop().create_task(client.call("BLPOP", "resp:never", 10))
            await asyncio.sleep(0)  # let it send
            began = time.monotonic()
            server.kill()
            with pytest.raises(RespConnectionError):
                await waiting
            assert time.monotonic() - began < 2.0  # not the 5 s timeout
            with pytest.raises(RespConnectionError, match="cannot connect"):
                await client.call("PING")  # the port is closed now
            restarted = PrivateRedis(tmp_path / "redis", port=server.port).start()
            try:
                assert await client.call("PING") == b"PONG"  # reconnected lazily
            finally:
                restarted.kill()
        finally:
            await client.aclose()


@pytest.mark.needs_redis
async def test_one_connection_whatever_the_concurrency(tmp_path: Path) -> None:
    with started(tmp_path) as server:
        client = RespClient.from_url(server.url, timeout=5.0)
        try:
            await asyncio.gather(*(client.call("INCR", "n") for _ in range(1000)))
            assert await client.call("GET", "n") == b"1000"
            info = await client.call("INFO", "clients")
            assert isinstance(info, bytes) and b"connected_clients:1\r\n" in info
        finally:
            await client.aclose()


@contextlib.contextmanager
def password_server(tmp_path: Path, password: str) -> Iterator[tuple[int, int]]:
    """A private redis-server with --requirepass: (port, pid)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--dir", str(tmp_path), "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, "redis-server exited"
            assert time.monotonic() < deadline, "redis-server did not start"
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"-NOAUTH"):
                    break
            time.sleep(0.02)  # polling for the port to open; nothing to wait on
        yield port, proc.pid
    finally:
        proc.kill()  # our own process, by its pid
        proc.wait(5)


@pytest.mark.needs_redis
async def test_auth_and_select_from_the_url(tmp_path: Path) -> None:
    with password_server(tmp_path, "s3cret") as (port, _):
        db3 = RespClient.from_url(f"redis://:s3cret@127.0.0.1:{port}/3")
        db0 = RespClient.from_url(f"redis://default:s3cret@127.0.0.1:{port}/0")
        no_password = RespClient.from_url(f"redis://127.0.0.1:{port}/0")
        wrong = RespClient.from_url(f"redis://:nope@127.0.0.1:{port}/0")
        try:
            assert await db3.call("SET", "k", "v") == b"OK"
            assert await db3.call("DBSIZE") == 1
            assert await db0.call("DBSIZE") == 0  # SELECT 3 went to db3's connection only
            with pytest.raises(RespError, match="NOAUTH"):
                await no_password.call("DBSIZE")
            with pytest.raises(RespError, match=r"WRONGPASS|invalid password"):
                await wrong.call("DBSIZE")
            assert not wrong.connected  # a failed handshake leaves no connection
        finally:
            for client in (db3, db0, no_password, wrong):
                await client.aclose()


@pytest.mark.needs_redis
async def test_a_connect_that_cannot_finish_times_out(tmp_path: Path) -> None:
    """A stopped server still accepts TCP connections (the kernel does); the AUTH of
    the handshake then gets no answer within the connect timeout."""
    with password_server(tmp_path, "pw") as (port, pid):
        client = RespClient.from_url(f"redis://:pw@127.0.0.1:{port}/0", timeout=0.2)
        os.kill(pid, signal.SIGSTOP)
        try:
            began = time.monotonic()
            with pytest.raises(RespTimeoutError):
                await client.call("PING")
            assert time.monotonic() - began < 1.0
            assert not client.connected
        finally:
            os.kill(pid, signal.SIGCONT)
            await client.aclose()
        assert await client.call("PING") == b"PONG"
        await client.aclose()
