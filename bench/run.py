"""Tollway benchmark: Tollway against nginx as a reference proxy, in one run.

    uv run python bench/run.py                      # everything (about 5-8 minutes)
    uv run python bench/run.py --scenarios nginx --duration 2 --rounds 1

See bench/README.md for what each line means. Exit status: 0 when every target that
ran passed, 1 when a target failed or a scenario could not run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import accounts
import exact_load
import nginx as nginx_conf
from harness import (
    BenchError,
    Cores,
    Proc,
    Processes,
    WrkResult,
    ensure_tools,
    free_port,
    http_get,
    pinned,
    process_tree,
    run_wrk,
    tool,
    tool_version,
    wait_port,
)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
CONFIGS = BENCH_DIR / "configs"
RESULTS = BENCH_DIR / "results"

SCENARIOS = (
    "nginx", "noplugins", "balanced", "plugins", "keyauth", "usage", "ratelimit",
    "ratelimitredis", "usagerows", "soak", "router",
)  # fmt: skip
THROUGHPUT = (
    "nginx", "noplugins", "balanced", "plugins", "keyauth", "usage", "ratelimit",
    "ratelimitredis",
)  # fmt: skip
# Targets `alone()` leaves running: "direct" is the upstream every target proxies to,
# and nginx has no timers that wake it while idle.
NEVER_FROZEN = ("nginx", "direct")
# Scenarios with a key provisioned in the gateway's database (the header wrk sends).
KEYED = ("keyauth", "usage", "ratelimit", "ratelimitredis")

TOLLWAY_START_DEADLINE_S = 20.0
WARMUP_S = 2
# Before each measured run the machine must be quiet: a scenario's aftermath (the
# usage gateway still draining its queue into PostgreSQL, PostgreSQL's checkpoint
# after hundreds of thousands of rows) otherwise lands on whichever scenario runs
# next. Every proxy, the reference included, waits the same way, up to a bound.
QUIET_BUSY_FRACTION = 0.15  # of all cores, over one sample
QUIET_SAMPLE_S = 0.5
QUIET_MAX_S = 20.0
MB = 1024 * 1024

# Targets from the issue.
RATIO_NOPLUGINS = 0.6
P99_NOPLUGINS_MS = 3.0
RATIO_PLUGINS = 0.5
# Issue 4: key-auth (warm) costs at most 10 % of the no-plugin throughput; usage
# records written to PostgreSQL cost at most 5 % more, and every request is a row.
RATIO_KEYAUTH_TO_NOPLUGINS = 0.90
RATIO_USAGE_TO_KEYAUTH = 0.95
# Issue 5: key-auth + rate-limit (three windows, never refusing) costs at most 15 %
# of the no-plugin throughput with the in-process store, 40 % with Redis; and the
# Redis store makes one round trip (one EVALSHA) per request, whatever the windows.
RATIO_RATELIMIT_TO_NOPLUGINS = 0.85
RATIO_RATELIMIT_REDIS_TO_NOPLUGINS = 0.6
# Issue 6: three targets in round robin cost under 5 % against one target.
RATIO_BALANCED_TO_NOPLUGINS = 0.95
EVALS_PER_REQUEST = (0.99, 1.01)
EXACT_REDIS_REQUESTS = 20_000
# The machine's shared Redis, for `--redis-url shared` (never flushed: the run uses
# its own namespace). By default the run starts a private redis-server instead.
SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"
# Commands that run a script: one of them is one round trip of the limiter.
EVAL_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro")
REDIS_KEY_PREFIX = "tollway:rl:"  # limits.redis_store's default prefix
NAMESPACE_PLACEHOLDER = "namespace: BENCH_NAMESPACE"
USAGE_EXACT_REQUESTS = 200_000
SOAK_FIRST = 200_000
SOAK_TOTAL = 1_000_000
SOAK_RSS_LIMIT_MB = 80.0
SOAK_GROWTH_TOLERANCE_MB = 2.0  # "no growth": allocator noise allowed, a leak is not
SOAK_BUDGET_S = 300.0
SOAK_SLICE_MAX_REQUESTS = 100_000
ROUTER_LIMIT_US = 20.0
BUSY_LOAD = 0.5  # 1-minute load average above which the machine is not idle

CORS_ORIGIN = "https://app.example.com"


# ---------------------------------------------------------------- model


@dataclass
class Target:
    key: str
    label: str
    port: int = 0
    proc: Proc | None = None
    headers: tuple[str, ...] = ()
    rounds: list[WrkResult] = field(default_factory=list)
    rss_kb: int = 0
    error: str | None = None
    # Requests wrk completed in the warm-up (not in `rounds`); for row accounting.
    warm_requests: int = 0
    # Usage scenario: the database the rows go to, and the rows found after stop.
    database_url: str | None = None
    usage_rows: int | None = None
    # Redis rate-limit scenario: script calls seen by Redis and requests answered by
    # the gateway during this target's own wrk runs (warm-up included).
    admin_port: int = 0
    redis: EvalCount | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.rounds)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(r, attr) for r in self.rounds))

    def to_dict(self, reference_rps: float | None) -> dict[str, Any]:
        d: dict[str, Any] = {"label": self.label, "error": self.error}
        if self.ok:
            rps = self.median("rps")
            d.update(
                rps=rps,
                ratio_to_nginx=rps / reference_rps if reference_rps else None,
                p50_ms=self.median("p50_ms"),
                p99_ms=self.median("p99_ms"),
                rss_mb=self.rss_kb / 1024,
                errors=sum(r.errors for r in self.rounds),
                rounds=[r.to_dict() for r in self.rounds],
            )
        if self.redis is not None:
            r = self.redis
            d["redis"] = {
                "namespace": r.namespace,
                "script_calls": r.evals,
                "requests_answered": r.answered,
                "per_request": r.evals / r.answered if r.answered else None,
                "error": r.error,
                "exact": {
                    "requests": EXACT_REDIS_REQUESTS,
                    "statuses": r.exact_statuses,
                    "answered": r.exact_answered,
                    "commands": r.exact_commands,
                    "connections": r.exact_connections,
                    "error": r.exact_error,
                },
            }
        return d


@dataclass
class EvalCount:
    """Redis round trips per request of the Redis rate-limit gateway, two ways.

    Requests: the sum of tollway_requests_total on the gateway's admin /metrics
    (one worker: rendering flushes the process's counters first, so the figure is
    exact at that moment); it counts every request the proxy answered, including
    the ones wrk cut in flight at the end of a run (wrk's own count leaves those out).

    1. Over the wrk runs (warm-up and rounds): INFO commandstats, the `calls` of
       EVAL_COMMANDS, whole server. The Redis is shared: tests running on it at the
       same time add script calls this gateway did not make, so this figure is only
       an upper bound (it read 1.10 with three test suites on the Redis).
    2. Exact, the figure the check uses: after the rounds, EXACT_REDIS_REQUESTS more
       requests with MONITOR on, counting every command sent from this gateway's own
       Redis connections (its sockets, found in /proc) and nothing else.
    """

    url: str
    admin_port: int
    namespace: str
    evals: int = 0
    answered: int = 0
    error: str | None = None
    # The exact phase.
    exact_statuses: dict[int, int] = field(default_factory=dict)
    exact_answered: int = 0
    exact_commands: dict[str, int] = field(default_factory=dict)  # by command name
    exact_connections: int = 0
    exact_error: str | None = None

    def around(self, run: Callable[[], WrkResult]) -> WrkResult:
        """Run `run` (one wrk run), adding what it caused to both counts."""
        try:
            evals0, answered0 = redis_evals(self.url), gateway_requests(self.admin_port)
        except (BenchError, OSError) as exc:
            self.error = f"could not read the counts: {exc}"
        result = run()
        if self.error is None:
            try:
                self.evals += redis_evals(self.url) - evals0
                self.answered += gateway_requests(self.admin_port) - answered0
            except (BenchError, OSError) as exc:
                self.error = f"could not read the counts: {exc}"
        return result


@dataclass
class Check:
    name: str
    status: str  # PASS, FAIL, ERROR, SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status:<5} {self.name}: {self.detail}"


@dataclass
class SoakResult:
    error: str | None = None
    aborted: bool = False
    samples: list[tuple[int, int]] = field(default_factory=list)  # (requests, rss kB)
    at_first: tuple[int, int] | None = None
    at_total: tuple[int, int] | None = None
    errors: int = 0
    seconds: float = 0.0


@dataclass
class UsageRowsResult:
    """Exactly USAGE_EXACT_REQUESTS keyed requests, then SIGTERM, then the rows counted."""

    error: str | None = None
    statuses: dict[int, int] = field(default_factory=dict)
    rows: int | None = None
    seconds: float = 0.0


# ---------------------------------------------------------------- helpers


def loadavg() -> float:
    """The 1-minute load average (0.0 when /proc/loadavg cannot be read)."""
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0.0


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all cores since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])
    return total - idle, total


def wait_quiet() -> float:
    """Wait until one sample shows the machine mostly idle (bounded); the seconds
    waited. Everything the benchmark started is idle between runs, so what is busy
    then is background work some earlier scenario caused."""
    started = time.monotonic()
    try:
        busy0, total0 = _cpu_times()
    except (OSError, ValueError, IndexError):
        return 0.0
    while time.monotonic() - started < QUIET_MAX_S:
        time.sleep(QUIET_SAMPLE_S)
        busy1, total1 = _cpu_times()
        span = total1 - total0
        if span > 0 and (busy1 - busy0) / span < QUIET_BUSY_FRACTION:
            break
        busy0, total0 = busy1, total1
    else:
        log(f"  machine still busy after {QUIET_MAX_S:g}s; measuring anyway")
    return time.monotonic() - started


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def fmt_ms(v: float) -> str:
    return f"{v * 1000:.0f}us" if v < 1 else f"{v:.2f}ms"


def tollway_argv(config: Path, port: int, admin_port: int, cmd: str) -> list[str]:
    """`uv run tollway serve ...`; the venv's own `tollway` script when we run in it.

    run.py itself runs under `uv run`, so the environment is already synced; going
    straight to the script keeps a `uv` launcher out of the process tree (its RSS and
    its signal forwarding would blur the measurement).
    """
    if cmd == "auto":
        script = Path(sys.executable).parent / "tollway"
        base = [str(script)] if script.exists() else ["uv", "run", "--no-sync", "tollway"]
    elif cmd == "uv":
        base = ["uv", "run", "--no-sync", "tollway"]
    else:
        base = cmd.split()
    return [
        *base,
        "serve",
        "--config",
        str(config),
        "--port",
        str(port),
        "--admin-port",
        str(admin_port),
        "--workers",
        "1",
    ]


def start_nginx(procs: Processes, tmp: Path, name: str, conf: str, core: int, port: int) -> Proc:
    path = nginx_conf.write_conf(tmp, name, conf)
    argv = pinned(
        core, [tool("nginx"), "-p", str(tmp), "-c", str(path), "-e", str(tmp / f"{name}-error.log")]
    )
    proc = procs.start(name, argv)
    if not wait_port(port, 10.0, proc):
        tail = proc.stderr_tail()
        err_log = tmp / f"{name}-error.log"
        if err_log.exists():
            tail += "\n" + "\n".join(err_log.read_text(errors="replace").splitlines()[-10:])
        raise BenchError(f"nginx {name} did not start on port {port}:\n{tail}")
    status, body = http_get(port)
    if status != 200 or len(body) != nginx_conf.BODY_SIZE:
        raise BenchError(f"nginx {name}: GET / gave {status} with {len(body)} bytes")
    return proc


def start_redis(procs: Processes, tmp: Path, core: int) -> str:
    """A private redis-server on the load core, without persistence; returns its URL.

    The machine's shared Redis floats over both cores. Whenever the scheduler put it
    on the proxy core, it took CPU from the gateway under test: the Redis scenario
    measured 0.50 to 0.55 of no plugins against that Redis and 0.57 to 0.69 against
    this one, in alternating runs. A Redis of the benchmark's own, pinned beside the
    upstream and wrk, is also what production looks like from the gateway's core (a
    Redis that is not on it). `--redis-url` measures against any other server.
    """
    port = free_port()
    argv = pinned(
        core,
        [
            tool("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(tmp),
        ],
    )  # fmt: skip
    proc = procs.start("redis", argv)
    if not wait_port(port, 10.0, proc):
        raise BenchError(f"redis-server did not start on port {port}:\n{proc.stderr_tail()}")
    return f"redis://127.0.0.1:{port}/0"


def start_tollway(
    procs: Processes,
    tmp: Path,
    name: str,
    config: Path,
    core: int,
    upstream_port: int,
    cmd: str,
    extra_env: dict[str, str] | None = None,
    check_headers: tuple[str, ...] = (),
    admin_port: int = 0,
) -> tuple[Proc, int]:
    """Start Tollway pinned to `core`; BenchError("tollway did not start ...") on failure."""
    port, admin_port = free_port(), admin_port or free_port()
    data_dir = tmp / f"{name}-data"
    data_dir.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "TOLLWAY_LOG_LEVEL": "warning",
        "TOLLWAY_DATA_DIR": str(data_dir),
        "TOLLWAY_HOST": "127.0.0.1",
        "TOLLWAY_ADMIN_HOST": "127.0.0.1",
        "TOLLWAY_ACCESS_LOG": str(tmp / f"{name}-access.log"),
        "BENCH_UPSTREAM_PORT": str(upstream_port),
        "BENCH_ACCESS_LOG": str(tmp / f"{name}-access.log"),
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    argv = pinned(core, tollway_argv(config, port, admin_port, cmd))
    try:
        proc = procs.start(name, argv, env=env, cwd=REPO)
    except OSError as exc:
        raise BenchError(f"tollway did not start: {exc}") from exc
    deadline = time.monotonic() + TOLLWAY_START_DEADLINE_S
    if not wait_port(port, TOLLWAY_START_DEADLINE_S, proc):
        code = proc.poll()
        why = f"exited with {code}" if code is not None else "port not open after 20 s"
        tail = proc.stderr_tail() or "(no output)"
        procs.stop(proc)
        raise BenchError(f"tollway did not start ({why}); output tail:\n{tail}")
    # The port may open before the proxy path is ready: retry GET / within the deadline.
    problem = ""
    while True:
        try:
            status, body = http_get(port, headers=check_headers)
        except OSError as exc:
            problem = f"GET / failed: {exc}"
        else:
            if status == 200 and len(body) == nginx_conf.BODY_SIZE:
                return proc, port
            problem = (
                f"GET / gave {status} with {len(body)} bytes (want 200 and {nginx_conf.BODY_SIZE})"
            )
        if proc.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.25)
    tail = proc.stderr_tail() or "(no output)"
    procs.stop(proc)
    raise BenchError(f"tollway started but {problem}; output tail:\n{tail}")


def redis_evals(url: str) -> int:
    """Script calls Redis has run since its start (INFO commandstats)."""
    from redis import Redis, RedisError

    client = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        stats = client.info("commandstats")
    except (RedisError, OSError) as exc:
        raise BenchError(f"INFO commandstats on {url}: {exc}") from exc
    finally:
        client.close()
    return sum(int(stats.get(f"cmdstat_{cmd}", {}).get("calls", 0)) for cmd in EVAL_COMMANDS)


def delete_namespace(url: str, namespace: str) -> int:
    """Delete this run's rate-limit counters (its own namespace only; never a flush)."""
    from redis import Redis, RedisError

    client = Redis.from_url(url, socket_timeout=5.0, socket_connect_timeout=5.0)
    try:
        # Keys read "<prefix>{<count>|<len>:<namespace>|...}:<slot>" (redis_store).
        pattern = f"{REDIS_KEY_PREFIX}*:{namespace}|*"
        keys = list(client.scan_iter(match=pattern, count=1000))
        return int(client.delete(*keys)) if keys else 0
    except (RedisError, OSError) as exc:
        log(f"warning: could not delete the bench counters ({pattern}): {exc}")
        return 0
    finally:
        client.close()


def gateway_requests(admin_port: int) -> int:
    """Requests the gateway answered: tollway_requests_total summed over its labels."""
    return sum(n for what, n in gateway_answers(admin_port).items() if what.startswith("status "))


def gateway_answers(admin_port: int) -> Counter[str]:
    """What the gateway answered so far, from its /metrics: "status 200" counts (from
    tollway_requests_total) and "code <error code>" counts (tollway_gateway_errors_total)."""
    status, body = http_get(admin_port, "/metrics")
    if status != 200:
        raise BenchError(f"GET /metrics on the admin port gave {status}")
    found: Counter[str] = Counter()
    for line in body.decode().splitlines():
        for family, label, kind in (
            ("tollway_requests_total{", "status", "status"),
            ("tollway_gateway_errors_total{", "code", "code"),
        ):
            if line.startswith(family):
                match = re.search(label + r'="([^"]*)"', line)
                if match is not None:
                    found[f"{kind} {match.group(1)}"] += round(float(line.rsplit(None, 1)[1]))
    return found


def namespaced_config(tmp: Path, name: str, namespace: str) -> Path:
    """A temp copy of configs/<name> with the rate-limit namespace made unique."""
    text = (CONFIGS / name).read_text()
    if text.count(NAMESPACE_PLACEHOLDER) != 1:
        raise BenchError(f"configs/{name} must hold exactly one {NAMESPACE_PLACEHOLDER!r}")
    path = tmp / name
    path.write_text(text.replace(NAMESPACE_PLACEHOLDER, f"namespace: {namespace}"))
    return path


class RedisMonitor(threading.Thread):
    """MONITOR on a Redis: commands counted by client address and command name,
    until the command that carries `sentinel` (sent by `stop()`) comes through."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.sentinel = f"bench-monitor-end-{uuid.uuid4().hex}"
        self.counts: Counter[tuple[str, str]] = Counter()
        self.error: str | None = None
        self.ready = threading.Event()

    def run(self) -> None:
        from redis import Redis, RedisError

        client = Redis.from_url(self.url, socket_timeout=30.0, socket_connect_timeout=5.0)
        conn = client.connection_pool.get_connection()
        try:
            conn.send_command("MONITOR")
            conn.read_response()  # OK
            self.ready.set()
            while True:
                raw = conn.read_response()
                line = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
                if self.sentinel in line:
                    return
                # <time> [<db> <client address, or lua>] "COMMAND" "arg" ...
                start, end = line.find("["), line.find("]")
                who = line[start + 1 : end].partition(" ")[2]
                command = line[end + 2 :].split('"', 2)[1].upper()
                self.counts[(who, command)] += 1
        except (RedisError, OSError, IndexError) as exc:
            self.error = f"MONITOR: {type(exc).__name__}: {exc}"
        finally:
            self.ready.set()
            conn.disconnect()
            client.close()

    def stop(self) -> None:
        from redis import Redis

        client = Redis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        try:
            client.echo(self.sentinel)
        finally:
            client.close()
        self.join(30.0)
        if self.is_alive():
            self.error = "MONITOR did not see the end marker within 30 s"


def redis_client_addresses(root_pid: int, redis_port: int) -> set[str]:
    """ "127.0.0.1:<port>" of every TCP connection the process tree of `root_pid` has
    open to `redis_port` (how MONITOR names a client), from /proc."""
    inodes: set[str] = set()
    for pid in process_tree(root_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    out: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            local, remote, inode = f[1], f[2], f[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                out.add(f"127.0.0.1:{int(local.rsplit(':', 1)[1], 16)}")
    return out


def exact_redis_count(t: Target, cores: Cores) -> None:
    """The exact phase of EvalCount: a known number of requests, MONITOR on, and the
    commands of this gateway's own Redis connections counted."""
    count = t.redis
    assert count is not None and t.proc is not None
    redis_port = urlsplit(count.url).port or 6379
    monitor = RedisMonitor(count.url)
    log(f"rate-limit (Redis): {EXACT_REDIS_REQUESTS:,} requests with Redis MONITOR on")
    try:
        answered0 = gateway_requests(count.admin_port)
        monitor.start()
        monitor.ready.wait(10.0)
        if monitor.error is not None:
            raise BenchError(monitor.error)
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cores.load})  # the loader beside the upstream, like wrk
        try:
            statuses = exact_load.send_exactly(t.port, t.headers, EXACT_REDIS_REQUESTS)
        finally:
            os.sched_setaffinity(0, own)
        count.exact_answered = gateway_requests(count.admin_port) - answered0
        # The limiter's connections stay open in its pool: read them before stop().
        ours = redis_client_addresses(t.proc.pid, redis_port)
        monitor.stop()
        if monitor.error is not None:
            raise BenchError(monitor.error)
        count.exact_statuses = dict(statuses)
        count.exact_connections = len(ours)
        commands: Counter[str] = Counter()
        for (who, command), n in monitor.counts.items():
            if who in ours:
                commands[command] += n
        count.exact_commands = dict(commands)
    except (BenchError, OSError, ConnectionError) as exc:
        count.exact_error = str(exc)
    finally:
        if monitor.is_alive():
            monitor.stop()


def wrk_for(target: Target, cores: Cores, duration: int, connections: int) -> WrkResult:
    return run_wrk(
        target.port,
        core=cores.load,
        duration_s=duration,
        connections=connections,
        headers=target.headers,
    )


# ---------------------------------------------------------------- scenarios


def counted(t: Target, run: Callable[[], WrkResult]) -> WrkResult:
    """One wrk run; for the Redis rate-limit target, with script calls counted."""
    return run() if t.redis is None else t.redis.around(run)


def alone(targets: list[Target], measured: Target) -> None:
    """Freeze every other target and thaw `measured`.

    All targets share the proxy core, and an idle gateway still wakes up (connection
    sweeps, database polls: about 1 % of a core each); six of them took several
    per cent from whichever target was being measured, nginx included.
    """
    for t in targets:
        if t.proc is not None and t is not measured and t.key not in NEVER_FROZEN:
            t.proc.freeze()
    if measured.proc is not None:
        measured.proc.thaw()


def thaw_all(targets: list[Target]) -> None:
    for t in targets:
        if t.proc is not None:
            t.proc.thaw()


def throughput(
    targets: list[Target], cores: Cores, duration: int, connections: int, rounds: int
) -> None:
    try:
        measure_rounds(targets, cores, duration, connections, rounds)
    finally:
        thaw_all(targets)


def measure_rounds(
    targets: list[Target], cores: Cores, duration: int, connections: int, rounds: int
) -> None:
    live = [t for t in targets if t.error is None]
    for t in live:
        log(f"warm-up {t.label} ({WARMUP_S}s)")
        alone(targets, t)
        try:
            t.warm_requests = counted(t, partial(wrk_for, t, cores, WARMUP_S, connections)).requests
        except BenchError as exc:
            t.error = f"warm-up failed: {exc}"
    for rnd in range(1, rounds + 1):
        for t in targets:
            if t.error is not None:
                continue
            if t.proc is not None and t.proc.poll() is not None:
                t.error = f"process exited ({t.proc.poll()}): {t.proc.stderr_tail(10)}"
                continue
            alone(targets, t)
            waited = wait_quiet()
            try:
                before = gateway_answers(t.admin_port) if t.admin_port else None
                r = counted(t, partial(wrk_for, t, cores, duration, connections))
                if r.non_2xx and before is not None:
                    # Which answers wrk counted as errors: kept in the results.
                    after = gateway_answers(t.admin_port)
                    after.subtract(before)
                    r.answered = {k: v for k, v in sorted(after.items()) if v > 0}
            except BenchError as exc:
                t.error = str(exc)
                continue
            t.rounds.append(r)
            log(
                f"round {rnd}/{rounds} {t.label:<40} {r.rps:>10.1f} req/s  "
                f"p50 {fmt_ms(r.p50_ms)}  p99 {fmt_ms(r.p99_ms)}"
                + (f"  errors {r.errors}" if r.errors else "")
                + (f" {r.answered}" if r.answered else "")
                + (f"  (waited {waited:.1f}s for a quiet machine)" if waited > 1.0 else "")
            )
    for t in targets:
        if t.proc is not None and t.proc.poll() is None:
            t.rss_kb = t.proc.rss_kb()


def soak(
    procs: Processes,
    tmp: Path,
    cores: Cores,
    upstream_port: int,
    connections: int,
    cmd: str,
) -> SoakResult:
    res = SoakResult()
    try:
        proc, port = start_tollway(
            procs, tmp, "tollway-soak", CONFIGS / "noplugins.yaml", cores.proxy, upstream_port, cmd
        )
    except BenchError as exc:
        res.error = str(exc)
        return res
    start = time.monotonic()
    deadline = start + SOAK_BUDGET_S
    total = 0
    rate: float | None = None
    log(f"soak: {SOAK_TOTAL:,} requests through tollway (no plugins), budget {SOAK_BUDGET_S:.0f}s")
    try:
        while total < SOAK_TOTAL:
            left_s = deadline - time.monotonic()
            if left_s < 1:
                res.aborted = True
                break
            goal = SOAK_FIRST if total < SOAK_FIRST else SOAK_TOTAL
            want = min(goal - total, SOAK_SLICE_MAX_REQUESTS)
            slice_s = 5 if rate is None else max(1, min(10, math.ceil(want / max(rate, 1.0))))
            slice_s = max(1, min(slice_s, int(left_s)))
            r = run_wrk(port, core=cores.load, duration_s=slice_s, connections=connections)
            if proc.poll() is not None:
                res.error = f"tollway exited during the soak: {proc.stderr_tail(10)}"
                break
            ok = r.requests - r.non_2xx
            res.errors += r.errors
            total += ok
            rate = ok / r.duration_s if r.duration_s > 0 else r.rps
            rss = proc.rss_kb()
            res.samples.append((total, rss))
            if res.at_first is None and total >= SOAK_FIRST:
                res.at_first = (total, rss)
            log(f"soak: {total:>9,} requests  RSS {rss / 1024:.1f} MB")
        if total >= SOAK_TOTAL and res.samples:
            res.at_total = res.samples[-1]
    except BenchError as exc:
        res.error = str(exc)
    finally:
        res.seconds = time.monotonic() - start
        procs.stop(proc)
    return res


def usage_rows(
    procs: Processes, tmp: Path, cores: Cores, upstream_port: int, cmd: str
) -> UsageRowsResult:
    """Send an exact number of requests with usage to PostgreSQL; every one is a row."""
    res = UsageRowsResult()
    url = accounts.create_pg_database()
    try:
        data_dir = tmp / "tollway-usagerows-data"
        headers = (f"X-API-Key: {accounts.provision(url, data_dir)}",)
        proc, port = start_tollway(
            procs,
            tmp,
            "tollway-usagerows",
            CONFIGS / "usage.yaml",
            cores.proxy,
            upstream_port,
            cmd,
            extra_env={"TOLLWAY_DATABASE_URL": url},
            check_headers=headers,
        )
        log(f"usage rows: {USAGE_EXACT_REQUESTS:,} keyed requests, then SIGTERM")
        start = time.monotonic()
        # The loader runs on the load core, beside the upstream, like wrk.
        own = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {cores.load})
        try:
            statuses = exact_load.send_exactly(port, headers, USAGE_EXACT_REQUESTS)
        finally:
            os.sched_setaffinity(0, own)
        res.seconds = time.monotonic() - start
        res.statuses = dict(statuses)
        procs.stop(proc)  # SIGTERM: the gateway writes its queue before it exits
        # The check request at start (start_tollway's GET /) is one more row.
        res.rows = accounts.usage_rows(url) - 1
    except (BenchError, OSError) as exc:
        res.error = str(exc)
    finally:
        accounts.drop_pg_database(url)
    return res


def router() -> tuple[float | None, str | None]:
    """Run bench/router_bench.py's `run()` (µs per match among 10,000 routes)."""
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    try:
        from router_bench import run as router_run  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        return None, f"skipped: router bench missing ({exc})"
    try:
        us = float(router_run())
    except Exception as exc:
        return None, f"router bench failed: {type(exc).__name__}: {exc}"
    return us, None


# ---------------------------------------------------------------- report


def checks_for(
    targets: dict[str, Target],
    soak_res: SoakResult | None,
    router_res: tuple[float | None, str | None] | None,
    connections: int = 50,
    rows_res: UsageRowsResult | None = None,
) -> list[Check]:
    out: list[Check] = []
    ref = targets.get("nginx")
    ref_rps = ref.median("rps") if ref is not None and ref.ok else None

    def failed_responses(t: Target) -> int:
        # A fast error is not throughput: a proxy answering 502 must not pass.
        return sum(r.errors for r in t.rounds)

    def ratio_check(key: str, name: str, minimum: float) -> None:
        t = targets.get(key)
        if t is None:
            return
        title = f"{name}: req/s >= {minimum:.2f} x nginx"
        if not t.ok:
            out.append(Check(title, "ERROR", t.error or "no rounds"))
        elif failed_responses(t):
            out.append(Check(title, "FAIL", f"{failed_responses(t)} failed responses"))
        elif ref_rps is None:
            out.append(Check(title, "ERROR", "no nginx reference figure in this run"))
        else:
            ratio = t.median("rps") / ref_rps
            out.append(Check(title, "PASS" if ratio >= minimum else "FAIL", f"{ratio:.2f}"))

    ratio_check("noplugins", "tollway, no plugins", RATIO_NOPLUGINS)
    t = targets.get("noplugins")
    if t is not None:
        title = f"tollway, no plugins: p99 < {P99_NOPLUGINS_MS:g} ms at {{c}} connections"
        if t.ok and failed_responses(t):
            out.append(Check(title, "FAIL", f"{failed_responses(t)} failed responses"))
        elif t.ok:
            p99 = t.median("p99_ms")
            status = "PASS" if p99 < P99_NOPLUGINS_MS else "FAIL"
            out.append(Check(title, status, f"{p99:.2f} ms"))
        else:
            out.append(Check(title, "ERROR", t.error or "no rounds"))
    ratio_check("plugins", "tollway, request-id+cors+access-log", RATIO_PLUGINS)

    def relative_check(key: str, base_key: str, name: str, minimum: float) -> None:
        t, base = targets.get(key), targets.get(base_key)
        if t is None:
            return
        title = f"{name}: req/s >= {minimum:.2f} x {base_key}"
        if not t.ok:
            out.append(Check(title, "ERROR", t.error or "no rounds"))
        elif failed_responses(t):
            out.append(Check(title, "FAIL", f"{failed_responses(t)} failed responses"))
        elif base is None or not base.ok:
            out.append(Check(title, "ERROR", f"no {base_key} figure in this run"))
        else:
            ratio = t.median("rps") / base.median("rps")
            out.append(Check(title, "PASS" if ratio >= minimum else "FAIL", f"{ratio:.2f}"))

    relative_check("keyauth", "noplugins", "tollway, key-auth (warm)", RATIO_KEYAUTH_TO_NOPLUGINS)
    relative_check(
        "balanced", "noplugins", "tollway, 3 targets round robin", RATIO_BALANCED_TO_NOPLUGINS
    )
    relative_check(
        "usage", "keyauth", "tollway, key-auth + usage to PostgreSQL", RATIO_USAGE_TO_KEYAUTH
    )
    relative_check(
        "ratelimit",
        "noplugins",
        "tollway, key-auth + rate-limit (memory)",
        RATIO_RATELIMIT_TO_NOPLUGINS,
    )
    relative_check(
        "ratelimitredis",
        "noplugins",
        "tollway, key-auth + rate-limit (Redis)",
        RATIO_RATELIMIT_REDIS_TO_NOPLUGINS,
    )
    t = targets.get("ratelimitredis")
    if t is not None:
        low, high = EVALS_PER_REQUEST
        title = f"rate-limit (Redis): Redis commands per request in [{low:g}, {high:g}]"
        count = t.redis
        if not t.ok:
            out.append(Check(title, "ERROR", t.error or "no rounds"))
        elif count is None or count.exact_error is not None or count.exact_answered <= 0:
            why = count.exact_error if count is not None else None
            out.append(Check(title, "ERROR", why or "no requests counted"))
        else:
            # Exact: only this gateway's own connections are counted, so a test
            # running on the shared Redis meanwhile adds nothing. The 1 % of slack is
            # for the gateway's own background commands (a second round trip per
            # request would read 2.00); below 0.99, requests went unchecked.
            sent = sum(count.exact_commands.values())
            per = sent / count.exact_answered
            evals = sum(count.exact_commands.get(c.upper(), 0) for c in EVAL_COMMANDS)
            others = ", ".join(
                f"{name} {n:,}"
                for name, n in sorted(count.exact_commands.items())
                if name.lower() not in EVAL_COMMANDS
            )
            all_ok = count.exact_statuses == {200: EXACT_REDIS_REQUESTS}
            statuses = "all 200" if all_ok else f"statuses {count.exact_statuses}"
            whole = (
                f"{count.evals / count.answered:.3f} script calls per request "
                f"({count.evals:,} / {count.answered:,})"
                if count.error is None and count.answered > 0
                else f"not measured ({count.error})"
            )
            out.append(
                Check(
                    title,
                    "PASS" if low <= per <= high and all_ok else "FAIL",
                    f"{per:.4f}: {sent:,} commands from the gateway's "
                    f"{count.exact_connections} Redis connections for "
                    f"{count.exact_answered:,} requests answered, {statuses} "
                    f"(EVALSHA/EVAL {evals:,} = {evals / count.exact_answered:.4f} per "
                    f"request; other: {others or 'none'}); whole server over the "
                    f"wrk rounds: {whole}",
                )
            )
    t = targets.get("usage")
    if t is not None and t.ok:
        sent = t.warm_requests + sum(r.requests for r in t.rounds)
        # wrk counts completed responses; requests cut in flight when a wrk run ends
        # were still served and logged, at most one per connection per run.
        slack = connections * (len(t.rounds) + 1)
        title = "usage: every request is a row (after SIGTERM flush)"
        if t.usage_rows is None:
            out.append(Check(title, "ERROR", "rows not counted"))
        else:
            ok = sent <= t.usage_rows <= sent + slack
            out.append(
                Check(
                    title,
                    "PASS" if ok else "FAIL",
                    f"{t.usage_rows:,} rows for {sent:,} completed requests "
                    f"(up to {slack} more may be cut in flight)",
                )
            )

    if soak_res is not None:
        t1 = f"soak: RSS < {SOAK_RSS_LIMIT_MB:g} MB after {SOAK_TOTAL:,} requests"
        t2 = (
            f"soak: no RSS growth from {SOAK_FIRST:,} to {SOAK_TOTAL:,} requests "
            f"(tolerance {SOAK_GROWTH_TOLERANCE_MB:g} MB)"
        )
        if soak_res.error is not None:
            out.append(Check(t1, "ERROR", soak_res.error))
            out.append(Check(t2, "ERROR", "soak did not run"))
        elif soak_res.at_first is None or soak_res.at_total is None:
            reached = soak_res.samples[-1][0] if soak_res.samples else 0
            why = f"aborted after {soak_res.seconds:.0f}s at {reached:,} requests"
            out.append(Check(t1, "ERROR", why))
            out.append(Check(t2, "ERROR", why))
        else:
            (n1, r1), (n2, r2) = soak_res.at_first, soak_res.at_total
            mb1, mb2 = r1 / 1024, r2 / 1024
            out.append(
                Check(
                    t1,
                    "PASS" if mb2 < SOAK_RSS_LIMIT_MB else "FAIL",
                    f"{mb2:.1f} MB after {n2:,}",
                )
            )
            growth = mb2 - mb1
            out.append(
                Check(
                    t2,
                    "PASS" if growth <= SOAK_GROWTH_TOLERANCE_MB else "FAIL",
                    f"{mb1:.1f} MB after {n1:,} -> {mb2:.1f} MB after {n2:,} ({growth:+.1f} MB)",
                )
            )

    if rows_res is not None:
        n = f"{USAGE_EXACT_REQUESTS:,}"
        title = f"usage: {n} requests are exactly {n} rows"
        if rows_res.error is not None or rows_res.rows is None:
            out.append(Check(title, "ERROR", rows_res.error or "rows not counted"))
        else:
            ok = rows_res.statuses == {200: USAGE_EXACT_REQUESTS}
            ok = ok and rows_res.rows == USAGE_EXACT_REQUESTS
            out.append(
                Check(
                    title,
                    "PASS" if ok else "FAIL",
                    f"answers {rows_res.statuses}, {rows_res.rows:,} rows "
                    f"({rows_res.seconds:.0f}s)",
                )
            )

    if router_res is not None:
        us, note = router_res
        title = f"routing among 10,000 routes: < {ROUTER_LIMIT_US:g} us a request"
        if us is None:
            verdict = "SKIP" if note and note.startswith("skipped") else "ERROR"
            out.append(Check(title, verdict, note or ""))
        else:
            out.append(Check(title, "PASS" if us < ROUTER_LIMIT_US else "FAIL", f"{us:.2f} us"))
    return out


def table(targets: list[Target]) -> str:
    ref = next((t for t in targets if t.key == "nginx"), None)
    ref_rps = ref.median("rps") if ref is not None and ref.ok else None
    w = max([36, *(len(t.label) for t in targets)])
    head = (
        f"{'proxy':<{w}} {'req/s':>10} {'vs nginx':>9} {'p50':>9} {'p99':>9} "
        f"{'RSS':>9} {'errors':>7}"
    )
    lines = [head, "-" * len(head)]
    for t in targets:
        if not t.ok:
            reason = (t.error or "no rounds").splitlines()[0]
            lines.append(f"{t.label:<{w}} ERROR: {reason}")
            continue
        rps = t.median("rps")
        ratio = f"{rps / ref_rps:.2f}" if ref_rps else "-"
        lines.append(
            f"{t.label:<{w}} {rps:>10.1f} {ratio:>9} {fmt_ms(t.median('p50_ms')):>9} "
            f"{fmt_ms(t.median('p99_ms')):>9} {t.rss_kb / 1024:>7.1f}MB "
            f"{sum(r.errors for r in t.rounds):>7}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    p.add_argument("--connections", type=int, default=50, help="wrk connections (default 50)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument(
        "--scenarios",
        default="all",
        help="all, or a comma list of: " + ", ".join(SCENARIOS) + " (default all)",
    )
    p.add_argument("--skip-soak", action="store_true", help="leave out the 1M-request RSS soak")
    p.add_argument(
        "--json",
        type=Path,
        default=None,
        help="write results here (default bench/results/bench-<timestamp>.json)",
    )
    p.add_argument(
        "--tollway-cmd",
        default="auto",
        help="how to start tollway: auto (the venv's tollway script), uv "
        "(uv run --no-sync tollway), or a command line",
    )
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (confs, logs)")
    p.add_argument(
        "--redis-url",
        default=None,
        help="Redis of the ratelimitredis scenario: a URL, or 'shared' for "
        f"{SHARED_REDIS_URL} (never flushed); default: a private redis-server started "
        "on the load core",
    )
    args = p.parse_args(argv)
    names = {s.strip() for s in args.scenarios.split(",") if s.strip()}
    if "all" in names:
        names = set(SCENARIOS)
    unknown = names - set(SCENARIOS)
    if unknown or not names:
        p.error(f"unknown scenarios: {', '.join(sorted(unknown)) or '(none)'}")
    if args.skip_soak:
        names.discard("soak")
    if args.duration < 1 or args.rounds < 1 or args.connections < 1:
        p.error("--duration, --rounds and --connections must be at least 1")
    args.scenario_set = names
    return args


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scen: set[str] = args.scenario_set
    # Ctrl-C and SIGTERM both unwind through the finally that stops every process,
    # also when started from a shell that ignores SIGINT for background jobs.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _sigterm)

    private_redis = "ratelimitredis" in scen and args.redis_url is None
    ensure_tools(("nginx", "wrk", "redis-server") if private_redis else ("nginx", "wrk"))
    tool("taskset")
    if args.redis_url == "shared":
        args.redis_url = SHARED_REDIS_URL
    cores = Cores.detect()
    started = datetime.now(UTC)
    tmp = Path(tempfile.mkdtemp(prefix="tollway-bench-"))
    procs = Processes(tmp)
    targets: list[Target] = []
    soak_res: SoakResult | None = None
    router_res: tuple[float | None, str | None] | None = None
    rows_res: UsageRowsResult | None = None
    fatal: str | None = None
    load_before = loadavg()
    if load_before > BUSY_LOAD:
        log(
            f"warning: load average {load_before:.2f} before the run: something else is "
            "using the CPUs; absolute figures will be low and noisy (the ratios less so)"
        )
    log(
        f"cores: proxy under test on cpu{cores.proxy}; upstream nginx and wrk on cpu{cores.load}"
        + (" (only one core available: all share it)" if cores.shared else "")
    )
    try:
        if private_redis:
            args.redis_url = start_redis(procs, tmp, cores.load)
            log(f"private redis-server on cpu{cores.load}: {args.redis_url}")
        needs_upstream = bool(scen & {*THROUGHPUT, "soak", "usagerows"})
        upstream_port = 0
        upstream: Proc | None = None
        if needs_upstream:
            upstream_port = free_port()
            upstream = start_nginx(
                procs,
                tmp,
                "upstream",
                nginx_conf.upstream_conf(tmp, upstream_port),
                cores.load,
                upstream_port,
            )
        if scen & set(THROUGHPUT):
            ref = Target("nginx", "nginx (reference proxy)")
            ref.port = free_port()
            ref.proc = start_nginx(
                procs,
                tmp,
                "proxy",
                nginx_conf.proxy_conf(tmp, ref.port, upstream_port),
                cores.proxy,
                ref.port,
            )
            targets.append(ref)
            if "nginx" in scen:
                # RSS shown for this line is the upstream nginx's.
                targets.append(
                    Target(
                        "direct", "upstream direct (no proxy)", port=upstream_port, proc=upstream
                    )
                )
            for key, label, conf, headers in (
                ("noplugins", "tollway, no plugins", "noplugins.yaml", ()),
                ("balanced", "tollway, no plugins, 3 targets round robin", "balanced.yaml", ()),
                (
                    "plugins",
                    "tollway, request-id+cors+access-log",
                    "plugins.yaml",
                    (f"Origin: {CORS_ORIGIN}",),
                ),
                ("keyauth", "tollway, key-auth (warm, SQLite)", "keyauth.yaml", ()),
                ("usage", "tollway, key-auth + usage (PostgreSQL)", "usage.yaml", ()),
                ("ratelimit", "tollway, key-auth + rate-limit (memory)", "ratelimit.yaml", ()),
                (
                    "ratelimitredis",
                    "tollway, key-auth + rate-limit (Redis)",
                    "ratelimit_redis.yaml",
                    (),
                ),
            ):
                if key not in scen:
                    continue
                t = Target(key, label, headers=headers)
                log(f"starting {label}")
                try:
                    extra_env: dict[str, str] = {}
                    config = CONFIGS / conf
                    t.admin_port = free_port()
                    if key == "ratelimitredis":
                        # A namespace of its own: the shared Redis keeps other runs'
                        # counters, and this run must neither see nor touch them.
                        namespace = f"bench-{uuid.uuid4().hex[:12]}"
                        config = namespaced_config(tmp, conf, namespace)
                        extra_env["TOLLWAY_REDIS_URL"] = args.redis_url
                        t.redis = EvalCount(args.redis_url, t.admin_port, namespace)
                    if key in KEYED:
                        data_dir = tmp / f"tollway-{key}-data"
                        if key == "usage":
                            t.database_url = accounts.create_pg_database()
                            extra_env["TOLLWAY_DATABASE_URL"] = t.database_url
                        url = t.database_url or accounts.sqlite_url(data_dir)
                        raw = accounts.provision(url, data_dir)
                        t.headers = (f"X-API-Key: {raw}",)
                    t.proc, t.port = start_tollway(
                        procs,
                        tmp,
                        f"tollway-{key}",
                        config,
                        cores.proxy,
                        upstream_port,
                        args.tollway_cmd,
                        extra_env=extra_env,
                        check_headers=t.headers,
                        admin_port=t.admin_port,
                    )
                except (BenchError, OSError) as exc:
                    t.error = str(exc)
                    log(f"{label}: {exc}")
                targets.append(t)
            throughput(targets, cores, args.duration, args.connections, args.rounds)
            for t in targets:
                if t.redis is not None and t.ok:
                    exact_redis_count(t, cores)
            for t in targets:  # free core 0 for the soak
                if t.key in THROUGHPUT and t.key != "nginx" and t.proc is not None:
                    procs.stop(t.proc)  # SIGTERM: the usage queue is flushed before exit
                if t.database_url is not None:
                    try:
                        t.usage_rows = accounts.usage_rows(t.database_url)
                    finally:
                        accounts.drop_pg_database(t.database_url)
        if "usagerows" in scen:
            rows_res = usage_rows(procs, tmp, cores, upstream_port, args.tollway_cmd)
        if "soak" in scen:
            soak_res = soak(procs, tmp, cores, upstream_port, args.connections, args.tollway_cmd)
        procs.stop_all()
        if "router" in scen:
            log("router bench")
            router_res = router()
    except BenchError as exc:
        fatal = str(exc)
        log(f"error: {exc}")
    except KeyboardInterrupt:
        log("interrupted: stopping everything started")
        return 130
    finally:
        procs.stop_all()
        for t in targets:  # this run's counters only, also after an error or Ctrl-C
            if t.redis is not None and not private_redis:  # a private one went with its process
                delete_namespace(t.redis.url, t.redis.namespace)
        if args.keep_tmp:
            log(f"temp dir kept: {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    by_key = {t.key: t for t in targets}
    checks = checks_for(by_key, soak_res, router_res, args.connections, rows_res)
    checks = [
        Check(c.name.replace("{c}", str(args.connections)), c.status, c.detail) for c in checks
    ]

    print()
    print(
        f"Tollway benchmark {started:%Y-%m-%d %H:%M:%S} UTC; wrk -c{args.connections} "
        f"-d{args.duration}s, {args.rounds} interleaved round(s), median"
    )
    print(
        f"proxy on cpu{cores.proxy}; upstream nginx (1 KB JSON) and wrk on cpu{cores.load}; "
        f"{nginx_conf.BODY_SIZE}-byte body"
    )
    if load_before > BUSY_LOAD:
        print(f"warning: load average was {load_before:.2f} at the start (machine not idle)")
    if targets:
        print()
        print(table(targets))
    if soak_res is not None and soak_res.samples:
        print()
        first = soak_res.at_first
        last = soak_res.at_total or soak_res.samples[-1]
        if first is not None:
            print(f"soak: RSS after {first[0]:,} requests: {first[1] / 1024:.1f} MB")
        print(
            f"soak: RSS after {last[0]:,} requests: {last[1] / 1024:.1f} MB "
            f"({soak_res.seconds:.0f}s, {soak_res.errors} errors"
            + (", aborted at the time budget" if soak_res.aborted else "")
            + ")"
        )
    if router_res is not None and router_res[0] is not None:
        print(f"router: {router_res[0]:.2f} us per match among 10,000 routes")
    if fatal:
        print()
        print(f"ERROR {fatal}")
    if checks:
        print()
        print("targets:")
        for c in checks:
            print("  " + c.line().replace("\n", "\n        "))
    elif not fatal:
        print()
        print("targets: none selected (nginx-only run)")

    ref_t = by_key.get("nginx")
    ref_rps = ref_t.median("rps") if ref_t is not None and ref_t.ok else None
    result: dict[str, Any] = {
        "started": started.isoformat(),
        "args": {
            "duration": args.duration,
            "connections": args.connections,
            "rounds": args.rounds,
            "scenarios": sorted(scen),
        },
        "machine": {
            "cpus": os.cpu_count(),
            "proxy_cpu": cores.proxy,
            "load_cpu": cores.load,
            "loadavg_before": load_before,
            "python": platform.python_version(),
            "platform": platform.platform(),
            "nginx": tool_version([tool("nginx"), "-v"]),
            "wrk": tool_version([tool("wrk"), "-v"]),
        },
        "targets": {t.key: t.to_dict(ref_rps) for t in targets},
        "soak": None
        if soak_res is None
        else {
            "error": soak_res.error,
            "aborted": soak_res.aborted,
            "seconds": soak_res.seconds,
            "errors": soak_res.errors,
            "samples": [{"requests": n, "rss_mb": kb / 1024} for n, kb in soak_res.samples],
            "rss_mb_at_first": None if soak_res.at_first is None else soak_res.at_first[1] / 1024,
            "requests_at_first": None if soak_res.at_first is None else soak_res.at_first[0],
            "rss_mb_at_total": None if soak_res.at_total is None else soak_res.at_total[1] / 1024,
            "requests_at_total": None if soak_res.at_total is None else soak_res.at_total[0],
        },
        "usage_rows": None
        if rows_res is None
        else {
            "error": rows_res.error,
            "statuses": rows_res.statuses,
            "rows": rows_res.rows,
            "seconds": rows_res.seconds,
        },
        "router": None
        if router_res is None
        else {"us_per_match": router_res[0], "note": router_res[1]},
        "checks": [{"name": c.name, "status": c.status, "detail": c.detail} for c in checks],
        "error": fatal,
    }
    out_path: Path = args.json or RESULTS / f"bench-{started:%Y%m%d-%H%M%S}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    print()
    print(f"results: {out_path}")

    failed = fatal is not None or any(c.status in ("FAIL", "ERROR") for c in checks)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
