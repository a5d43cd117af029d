"""Python cost of one proxied request on the data plane, without sockets.

Drives the real ClientConnection and UpstreamConnection with in-memory transports:
what it measures is exactly the gateway's own per-request work (parsing, routing,
plugins, header rewriting, framing), which wrk figures mix with kernel time.

    uv run python bench/hotpath_bench.py [--plugins] [--profile]
    uv run python bench/hotpath_bench.py --key-auth   # warm key-auth vs no plugins
    uv run python bench/hotpath_bench.py --rate-limit # + rate-limit (memory), per hook
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
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
    b"Content-Type: application/json\r\nContent-Length: "
    + str(len(BODY)).encode()
    + b"\r\nConnection: keep-alive\r\n\r\n"
    + BODY
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


def driver(
    plugins: bool | str,
    request: bytes = REQUEST,
    runtime: Any = None,
    on_snapshot: Callable[[Any], None] | None = None,
) -> Any:
    """A warmed-up `one()`: one request through client and upstream connections.
    `on_snapshot` sees the snapshot before the first request (to instrument it)."""
    extra = plugins if isinstance(plugins, str) else (PLUGINS if plugins else "")
    text = CONFIG + extra
    snapshot = build_snapshot(load_config_text(text, "bench"), runtime=runtime)
    if on_snapshot is not None:
        on_snapshot(snapshot)
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
        client.data_received(request)
        upstream.data_received(RESPONSE)

    for _ in range(2000):
        one()
    assert pool.idle == [upstream], "the upstream connection was not reused"
    return one


async def measure(
    plugins: bool | str,
    n: int,
    profile: bool,
    request: bytes = REQUEST,
    runtime: Any = None,
) -> float:
    """µs per request; `plugins` True for the benchmark trio, or a YAML plugins list."""
    one = driver(plugins, request, runtime)
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


async def key_auth_runtime(data_dir: Path) -> tuple[Any, str]:
    """A runtime with a real SQLite database, one consumer and one key, the key's
    cache entry warm (the bench measures the warm path), and a usage recorder that
    queues but does not write (its writer's cost is the usage-logging benchmark)."""
    from tollway.identity import consumers, keys
    from tollway.identity.resolver import KeyResolver
    from tollway.runtime import Runtime
    from tollway.storage.database import Database, default_url
    from tollway.storage.migrate import upgrade
    from tollway.usage.recorder import UsageRecorder

    # A short queue: nothing writes it here, and a full 100,000-event queue would
    # make every garbage collection walk it, which the running writer prevents.
    # A TTL longer than the run: the bench never yields to the loop, so a refresh
    # (an await) would stall the connection rather than measure anything.
    settings = Settings(
        access_log="/dev/null",
        data_dir=data_dir,
        usage_queue_size=1000,
        key_cache_ttl=10 * 365 * 86400.0,
    )
    database = Database(default_url(data_dir))
    await upgrade(database)
    pepper = b"bench-pepper"
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="bench@example.com")
        new = await keys.create_key(session, pepper, consumer_id=consumer.id)
        await session.commit()
    resolver = KeyResolver(database, pepper, settings, None)
    warm = resolver.resolve(new.raw.encode())
    if not hasattr(warm, "error"):
        warm = await warm  # type: ignore[misc]
    assert warm.error is None  # type: ignore[union-attr]
    runtime = Runtime(
        settings=settings,
        database=database,
        pepper=pepper,
        keys=resolver,
        usage=UsageRecorder(database, settings),
    )
    return runtime, new.raw


async def key_auth_scenario(n: int, rounds: int) -> None:
    """No plugins vs key-auth (warm), in short batches taken in turn, so that the
    machine's drift and noise fall on every scenario alike; per scenario the fastest
    batch counts (noise only ever adds time), measured in this thread's CPU time."""
    with tempfile.TemporaryDirectory() as tmp:
        runtime, raw = await key_auth_runtime(Path(tmp))
        keyed = REQUEST.replace(b"\r\n\r\n", b"\r\nX-API-Key: " + raw.encode() + b"\r\n\r\n")
        ka = "plugins:\n  - name: key-auth\n"
        drivers = {
            "no plugins": driver("", REQUEST),
            # The key header costs parsing and forwarding with or without key-auth.
            "no plugins, key sent": driver("", keyed),
            "key-auth, usage off": driver(ka + "    config: {log_usage: false}\n", keyed, runtime),
            "key-auth + usage event": driver(ka, keyed, runtime),
        }
        best = dict.fromkeys(drivers, float("inf"))
        clock = time.thread_time
        for _ in range(rounds):
            for label, one in drivers.items():
                t0 = clock()
                for _ in range(n):
                    one()
                best[label] = min(best[label], (clock() - t0) / n * 1e6)
        base = best["no plugins"]
        for label, us in best.items():
            extra = (
                ""
                if label == "no plugins"
                else f"  {us - base:+.2f} us ({(us / base - 1) * 100:+.1f} %)"
            )
            print(f"{label:<24} {us:.2f} us per request{extra}")
        await runtime.database.dispose()


RATE_LIMIT = """    config: {log_usage: false}
  - name: rate-limit
    config:
      limits: [%s]
      key_by: consumer
"""
WINDOWS_3 = (
    "{per: second, limit: 1000000000}, {per: minute, limit: 1000000000}, "
    "{per: day, limit: 1000000000}"
)
WINDOWS_1 = "{per: second, limit: 1000000000}"


def _owner(hook: Callable[..., Any]) -> str:
    """The plugin name of a hook (rate-limit hands the pipeline its engine's method)."""
    owner = hook.__self__  # type: ignore[attr-defined]
    return getattr(owner, "name", None) or type(owner).__name__


class HookTimes:
    """Wraps a chain's access and response-header hooks to time each call
    (perf_counter_ns); what two back-to-back clock reads cost is measured too, to be
    taken off."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        clock = time.perf_counter_ns
        best = float("inf")
        for _ in range(20):
            total = 0
            for _ in range(10000):
                t0 = clock()
                total += clock() - t0
            best = min(best, total / 10000)
        self.floor_ns = best

    def wrap(self, label: str, hook: Callable[..., Any]) -> Callable[..., Any]:
        clock = time.perf_counter_ns
        ns, calls = self.ns, self.calls
        ns[label] = calls[label] = 0

        def timed(*args: Any) -> Any:
            t0 = clock()
            result = hook(*args)
            ns[label] += clock() - t0
            calls[label] += 1
            return result

        return timed

    def instrument(self, snapshot: Any) -> None:
        seen: set[int] = set()
        for chain in (snapshot.global_chain, *(r.chain for r in snapshot.routes)):
            if chain is None or id(chain) in seen:
                continue
            seen.add(id(chain))
            chain.access_hooks = tuple(
                (prio, self.wrap(f"{_owner(hook)} access", hook))
                for prio, hook in chain.access_hooks
            )
            chain.response_hooks = tuple(
                self.wrap(f"{_owner(hook)} response_headers", hook)
                for hook in chain.response_hooks
            )

    def reset(self) -> None:
        for label in self.ns:
            self.ns[label] = self.calls[label] = 0


async def rate_limit_scenario(n: int, rounds: int) -> None:
    """key-auth (warm) vs key-auth + rate-limit with the memory store (the bench's
    three never-refusing windows, and one window), in interleaved batches of thread
    CPU time as in --key-auth; then the time of each hook, measured inside a run."""
    from tollway.limits.memory import MemoryLimiter
    from tollway.limits.service import LimitService

    with tempfile.TemporaryDirectory() as tmp:
        runtime, raw = await key_auth_runtime(Path(tmp))
        runtime.limits = LimitService(MemoryLimiter())
        keyed = REQUEST.replace(b"\r\n\r\n", b"\r\nX-API-Key: " + raw.encode() + b"\r\n\r\n")
        ka = "plugins:\n  - name: key-auth\n"
        drivers = {
            "no plugins, key sent": driver("", keyed),
            "key-auth, usage off": driver(ka + "    config: {log_usage: false}\n", keyed, runtime),
            "+ rate-limit, 1 window": driver(ka + RATE_LIMIT % WINDOWS_1, keyed, runtime),
            "+ rate-limit, 3 windows": driver(ka + RATE_LIMIT % WINDOWS_3, keyed, runtime),
        }
        best = dict.fromkeys(drivers, float("inf"))
        clock = time.thread_time
        for _ in range(rounds):
            for label, one in drivers.items():
                t0 = clock()
                for _ in range(n):
                    one()
                best[label] = min(best[label], (clock() - t0) / n * 1e6)
        base = best["no plugins, key sent"]
        for label, us in best.items():
            extra = (
                ""
                if label == "no plugins, key sent"
                else f"  {us - base:+.2f} us ({(us / base - 1) * 100:+.1f} %)"
            )
            print(f"{label:<24} {us:.2f} us per request{extra}")

        times = HookTimes()
        one = driver(ka + RATE_LIMIT % WINDOWS_3, keyed, runtime, times.instrument)
        per_hook: dict[str, float] = {}
        for _ in range(max(1, rounds // 10)):
            times.reset()
            for _ in range(n * 10):
                one()
            for label in times.ns:
                if times.calls[label]:
                    us = times.ns[label] / times.calls[label] / 1000 - times.floor_ns / 1000
                    per_hook[label] = min(per_hook.get(label, float("inf")), us)
        print(f"per hook, 3 windows (best batch, timer cost {times.floor_ns:.0f} ns taken off):")
        for label, us in per_hook.items():
            print(f"  {label:<34} {us:.2f} us per call")
        await runtime.database.dispose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plugins", action="store_true")
    parser.add_argument("--each", action="store_true", help="cost of each plugin alone")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--key-auth", action="store_true", help="warm key-auth vs no plugins")
    parser.add_argument(
        "--rate-limit", action="store_true", help="key-auth + rate-limit (memory), per hook"
    )
    parser.add_argument("--rounds", type=int, default=200, help="batches per scenario")
    parser.add_argument("-n", type=int, default=20000)
    args = parser.parse_args()
    if args.rate_limit:
        uvloop.run(rate_limit_scenario(min(args.n, 1000), args.rounds))
        return 0
    if args.key_auth:
        uvloop.run(key_auth_scenario(min(args.n, 1000), args.rounds))
        return 0
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
