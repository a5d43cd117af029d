"""Python cost of one proxied request on the data plane, without sockets.

Drives the real ClientConnection and UpstreamConnection with in-memory transports:
what it measures is exactly the gateway's own per-request work (parsing, routing,
plugins, header rewriting, framing), which wrk figures mix with kernel time.

    uv run python bench/hotpath_bench.py [--plugins] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path
from typing import Any

import uvloop

from tollway.config.loader import load_config_text
from tollway.config.snapshot import build_snapshot
from tollway.gateway.dataplane import DataPlane
from tollway.gateway.server import ClientConnection
from tollway.settings import Settings
from tollway.upstream.connection import UpstreamConnection

REQUEST = (
    b"GET /api/items?id=7 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: wrk\r\n"
    b"Accept: */*\r\nOrigin: https://app.example.com\r\n\r\n"
)
BODY = b'{"data":"' + b"a" * 1005 + b'"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 23 Nov 2026 13:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: " + str(len(BODY)).encode()
    + b"\r\nConnection: keep-alive\r\n\r\n" + BODY
)
CONFIG = """
services:
  - name: up
    url: http://127.0.0.1:9
routes:
  - name: api
    service: up
    paths: [/api]
"""
PLUGINS = """
plugins:
  - name: request-id
  - name: cors
    config: {origins: ["https://app.example.com"]}
  - name: access-log
    config: {path: /dev/null}
"""


class FakeTransport:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...


async def measure(plugins: bool | str, n: int, profile: bool) -> float:
    """µs per request; `plugins` True for the benchmark trio, or a YAML plugins list."""
    extra = plugins if isinstance(plugins, str) else (PLUGINS if plugins else "")
    text = CONFIG + extra
    snapshot = build_snapshot(load_config_text(text, "bench"))
    settings = Settings(access_log="/dev/null")
    plane = DataPlane(settings, snapshot)
    service = snapshot.services["up"]
    pool = plane.pools.get(service.targets[0], service.pool)
    upstream = UpstreamConnection(pool)
    upstream.connection_made(FakeTransport())  # type: ignore[arg-type]
    pool.open = 1
    pool.idle.append(upstream)
    client = ClientConnection(plane)
    client.connection_made(FakeTransport())  # type: ignore[arg-type]

    def one() -> None:
        client.data_received(REQUEST)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    assert pool.idle == [upstream], "the upstream connection was not reused"
    runs = []
    prof = cProfile.Profile() if profile else None
    for _ in range(7):
        if prof:
            prof.enable()
        t0 = time.perf_counter()
        for _ in range(n):
            one()
        runs.append((time.perf_counter() - t0) / n * 1e6)
        if prof:
            prof.disable()
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    # The minimum, not the median: other work on the machine only ever adds time,
    # so the fastest run is the closest to the code's own cost.
    return min(runs)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", action="store_true")
    parser.add_argument("--each", action="store_true", help="cost of each plugin alone")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    if args.each:
        base = uvloop.run(measure(False, args.n, False))
        print(f"no plugins: {base:.1f} us")
        for line in PLUGINS.strip().splitlines()[1:]:
            if line.startswith("  - "):
                block = PLUGINS.split(line, 1)[1].split("\n  - ", 1)[0]
                one = "plugins:\n" + line + block + "\n"
                us = uvloop.run(measure(one, args.n, False))
                print(f"{line.strip():<28} +{us - base:.1f} us")
        return 0
    us = uvloop.run(measure(args.plugins, args.n, args.profile))
    label = "request-id+cors+access-log" if args.plugins else "no plugins"
    print(f"hot path, {label}: {us:.1f} us per request (Python only, no sockets)")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
