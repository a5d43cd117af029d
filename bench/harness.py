"""Benchmark plumbing: tools, free ports, pinned processes, wrk runs, RSS.

Every process is started in its own session (process group) and stopped by that
group id, so a proxy's workers go with it and nothing else is touched.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

WRK_TIMEOUT_MARGIN = 30.0


class BenchError(RuntimeError):
    """A step of the benchmark could not run (a process did not start, wrk failed)."""


# ---------------------------------------------------------------- tools


# Each tool the benchmark runs, and the Debian package that brings it.
PACKAGES = {"nginx": "nginx-light", "wrk": "wrk", "redis-server": "redis-server"}


def ensure_tools(names: Sequence[str] = ("nginx", "wrk")) -> None:
    """Install the tools in `names` with apt when missing (CI and fresh machines)."""
    missing = [t for t in names if find_tool(t) is None]
    if not missing:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise BenchError(f"missing {', '.join(missing)} and no apt-get to install them")
    prefix: list[str] = []
    if os.geteuid() != 0:
        sudo = shutil.which("sudo")
        if sudo is None:
            raise BenchError(f"missing {', '.join(missing)}; run as root or install sudo")
        prefix = [sudo, "-n"]
    print(f"installing {', '.join(missing)} with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([*prefix, apt, "update"], check=True, env=env)
    packages = [PACKAGES[t] for t in missing]
    subprocess.run([*prefix, apt, "install", "-y", *packages], check=True, env=env)
    still = [t for t in missing if find_tool(t) is None]
    if still:
        raise BenchError(f"{', '.join(still)} still missing after apt-get install")


def find_tool(name: str) -> str | None:
    """shutil.which, also looking in the sbin directories (nginx lives in /usr/sbin)."""
    found = shutil.which(name)
    if found:
        return found
    for d in ("/usr/sbin", "/sbin", "/usr/local/sbin"):
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def tool(name: str) -> str:
    found = find_tool(name)
    if found is None:
        raise BenchError(f"{name} not found")
    return found


def tool_version(argv: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(argv), check=False, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0].strip() if text else "unknown"


# ---------------------------------------------------------------- cores and ports


@dataclass(frozen=True)
class Cores:
    """Where things run: the proxy under test alone; upstream and wrk together."""

    proxy: int
    load: int
    shared: bool  # True when only one core was available and everything shares it

    @classmethod
    def detect(cls) -> Cores:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) >= 2:
            return cls(proxy=cpus[0], load=cpus[1], shared=False)
        return cls(proxy=cpus[0], load=cpus[0], shared=True)


def free_port() -> int:
    """A free high TCP port on 127.0.0.1 (the kernel picks from the ephemeral range)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, deadline_s: float, proc: Proc | None = None) -> bool:
    """Poll until 127.0.0.1:port accepts a connection; False on timeout or exit."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def http_get(
    port: int, path: str = "/", timeout: float = 5.0, headers: Sequence[str] = ()
) -> tuple[int, bytes]:
    """One plain HTTP/1.1 GET; returns (status, body). Enough to check a proxy works.

    Reads the body by Content-Length when given (so a server that keeps the
    connection open anyway does not stall us), else until the server closes.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        extra = "".join(f"{h}\r\n" for h in headers)
        s.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}"
            "Connection: close\r\n\r\n".encode()
        )
        raw = b""
        length: int | None = None
        head = b""
        while True:
            if length is None and b"\r\n\r\n" in raw:
                head = raw.split(b"\r\n\r\n", 1)[0]
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length" and value.strip().isdigit():
                        length = int(value.strip())
            if length is not None and len(raw) >= len(head) + 4 + length:
                break
            data = s.recv(65536)
            if not data:
                break
            raw += data
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    status = int(status_line[1]) if len(status_line) >= 2 and status_line[1].isdigit() else 0
    return status, body if length is None else body[:length]


# ---------------------------------------------------------------- processes


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    return [tool("taskset"), "-c", str(core), *argv]


class Proc:
    """A started process (own process group), its logs, stop by group id."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        logdir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.stdout_path = logdir / f"{name}.stdout.log"
        self.stderr_path = logdir / f"{name}.stderr.log"
        self._out: TextIO = self.stdout_path.open("w")
        self._err: TextIO = self.stderr_path.open("w")
        try:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=self._out,
                stderr=self._err,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        except OSError:
            self._out.close()
            self._err.close()
            raise
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        return self.popen.poll()

    def stderr_tail(self, lines: int = 20) -> str:
        """The last lines of stderr, or of stdout when stderr is empty."""
        for path in (self.stderr_path, self.stdout_path):
            try:
                text = path.read_text(errors="replace").strip()
            except OSError:
                continue
            if text:
                return "\n".join(text.splitlines()[-lines:])
        return ""

    def rss_kb(self) -> int:
        """Summed VmRSS of this process and its descendants (kB); 0 when gone."""
        return sum(vmrss_kb(pid) for pid in process_tree(self.pid))

    def freeze(self) -> None:
        """SIGSTOP the process group: an idle gateway's timers (sweeps, polls) stop
        waking up on the core another target is being measured on."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT the process group (harmless when it was not frozen)."""
        if self.popen.poll() is None:
            self._signal_group(signal.SIGCONT)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL it after `timeout` seconds."""
        if self.popen.returncode is None:
            self._signal_group(signal.SIGTERM)
            # A frozen process would hold SIGTERM pending until the timeout.
            self._signal_group(signal.SIGCONT, quiet=True)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                try:
                    self.popen.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    print(f"warning: {self.name} (pid {self.pid}) did not exit", file=sys.stderr)
        # Children that outlived the leader (same group) go too.
        self._signal_group(signal.SIGKILL, quiet=True)
        self._out.close()
        self._err.close()

    def _signal_group(self, sig: signal.Signals, quiet: bool = False) -> None:
        try:
            os.killpg(self.pid, sig)  # the group id is our child's pid (new session)
        except ProcessLookupError:
            pass
        except PermissionError as exc:
            if not quiet:
                print(f"warning: cannot signal {self.name}: {exc}", file=sys.stderr)


class Processes:
    """Owns every started process; `stop_all` (in a finally) ends them in reverse."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Proc:
        proc = Proc(name, argv, self.logdir, env=env, cwd=cwd)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            proc = self.procs.pop()
            try:
                proc.stop()
            except Exception as exc:  # keep stopping the others
                print(f"warning: stopping {proc.name}: {exc}", file=sys.stderr)


# ---------------------------------------------------------------- /proc


def vmrss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants, from the ppid field of /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: split after the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) >= 2:
            children.setdefault(int(fields[1]), []).append(int(entry))
    out: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        if pid in out:
            continue
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


# ---------------------------------------------------------------- wrk


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    # When there were non-2xx answers: what the gateway says it answered in that run,
    # "status 502" and "code upstream_unavailable" counts from its /metrics.
    answered: dict[str, int] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["errors"] = self.errors
        return d


_TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LAT = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_SOCK = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", re.MULTILINE
)
_NON2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)", re.MULTILINE)


def parse_wrk(text: str) -> WrkResult:
    """Parse `wrk --latency` output into a WrkResult; BenchError when it is not there."""
    lat = {m.group(1): float(m.group(2)) * _TIME_UNITS_MS[m.group(3)] for m in _LAT.finditer(text)}
    reqs = _REQS.search(text)
    rps = _RPS.search(text)
    if reqs is None or rps is None or not {"50", "99"} <= lat.keys():
        raise BenchError(f"could not parse wrk output:\n{text.strip()[-2000:]}")
    sock = _SOCK.search(text)
    socket_errors = (
        dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()), strict=True))
        if sock
        else {}
    )
    non = _NON2XX.search(text)
    return WrkResult(
        requests=int(reqs.group(1)),
        duration_s=float(reqs.group(2)) * _TIME_UNITS_MS[reqs.group(3)] / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=lat["50"],
        p75_ms=lat.get("75", float("nan")),
        p90_ms=lat.get("90", float("nan")),
        p99_ms=lat["99"],
        socket_errors=socket_errors,
        non_2xx=int(non.group(1)) if non else 0,
    )


def run_wrk(
    port: int,
    *,
    core: int,
    duration_s: int,
    connections: int,
    threads: int = 1,
    path: str = "/",
    headers: Sequence[str] = (),
    timeout_s: int = 5,
) -> WrkResult:
    """Run wrk pinned to `core` against 127.0.0.1:port and parse its output."""
    argv = pinned(
        core,
        [
            tool("wrk"),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, int(duration_s))}s",
            f"--timeout={timeout_s}s",
            "--latency",
            *(arg for h in headers for arg in ("-H", h)),
            f"http://127.0.0.1:{port}{path}",
        ],
    )
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=duration_s + timeout_s + WRK_TIMEOUT_MARGIN)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish: {exc}") from exc
    finally:
        # On a timeout, Ctrl-C or SIGTERM: end wrk and reap it (no zombie left behind).
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {(stderr or stdout).strip()}")
    return parse_wrk(stdout)
