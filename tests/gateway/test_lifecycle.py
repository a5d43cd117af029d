"""Process lifecycle: graceful SIGTERM, hot reload under load, SIGHUP, workers."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
from pathlib import Path

import httpx
import pytest

from support.gateway import GatewayProcess, api_config, running_gateway
from support.upstream import Received, RecordingUpstream, Reply


def route_config(upstream: RecordingUpstream, tag: str = "a") -> str:
    plugins = (
        "plugins:\n  - name: response-transformer\n    config:\n"
        f'      add:\n        headers: ["x-config: {tag}"]\n'
    )
    return api_config(upstream.url, plugins)


async def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    """Poll a cheap condition with a deadline; fail with `what` when it never holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


class Gate:
    """An upstream handler that holds every request until the test opens the gate."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, req: Received, reply: Reply) -> None:
        await req.complete.wait()
        await self.open.wait()
        reply.send(200, [("content-type", "text/plain")], req.target.encode())


async def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    gate = Gate()
    async with RecordingUpstream(gate) as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream))
        with GatewayProcess(config, env={"TOLLWAY_SHUTDOWN_TIMEOUT": "20"}) as gw:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
                pending = [
                    asyncio.create_task(client.get(f"/api/{i}", timeout=30)) for i in range(10)
                ]
                await wait_until(lambda: len(upstream.requests) == 10, what="10 requests upstream")
                gw.terminate()
                # Stop accepting: a new connection is refused while the 10 still run.
                await wait_until(lambda: not _accepts(gw.port), what="listener closed")
                gate.open.set()
                responses = await asyncio.gather(*pending)
            assert [r.status_code for r in responses] == [200] * 10
            assert sorted(r.text for r in responses) == sorted(f"/{i}" for i in range(10))
            assert await asyncio.to_thread(gw.wait, 20) == 0


async def test_sigterm_cuts_requests_past_the_deadline(tmp_path: Path) -> None:
    gate = Gate()  # never opened: the request outlives the shutdown deadline
    async with RecordingUpstream(gate) as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream))
        with GatewayProcess(config, env={"TOLLWAY_SHUTDOWN_TIMEOUT": "1"}) as gw:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
                pending = asyncio.create_task(client.get("/api/stuck", timeout=30))
                await wait_until(lambda: len(upstream.requests) == 1, what="request upstream")
                gw.terminate()
                assert await asyncio.to_thread(gw.wait, 15) == 0
                with pytest.raises(httpx.HTTPError):
                    await pending


def _accepts(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


async def test_hot_reload_under_load_fails_no_request(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, route_config(upstream, "v0")
    ) as gw:
        config = tmp_path / "tollway.yaml"
        seen: set[str] = set()
        failures: list[str] = []
        stop = asyncio.Event()
        sent = 0

        async def load() -> None:
            nonlocal sent
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
                while not stop.is_set():
                    try:
                        r = await client.get("/api/x", timeout=10)
                    except httpx.HTTPError as exc:
                        failures.append(repr(exc))
                        continue
                    sent += 1
                    if r.status_code != 200:
                        failures.append(f"{r.status_code} {r.text}")
                    seen.add(r.headers.get("x-config", ""))

        clients = [asyncio.create_task(load()) for _ in range(4)]
        for i in range(1, 21):
            text = route_config(upstream, f"v{i}")
            if i % 2:
                config.write_text(text)  # in place
            else:
                tmp = config.with_suffix(".tmp")
                tmp.write_text(text)
                os.replace(tmp, config)  # atomic rename, as config management does
            await wait_until(lambda i=i: gw.reloads >= i, what=f"reload {i}")
            before = sent
            await wait_until(lambda before=before: sent > before + 5, what="traffic after reload")
        stop.set()
        await asyncio.gather(*clients)
        assert failures == []
        assert gw.reloads == 20
        assert "v20" in seen and len(seen) > 5  # requests really ran on many snapshots


async def test_bad_reload_is_refused_and_old_config_keeps_serving(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, route_config(upstream, "good")
    ) as gw:
        config = tmp_path / "tollway.yaml"
        generation = gw.snapshot.generation if gw.snapshot else 0
        config.write_text(route_config(upstream, "bad") + "\nroutes_typo: [1]\n")
        await wait_until(lambda: gw.watcher is not None and gw.watcher.changes >= 1,
                         what="the watcher to see the bad file")
        assert gw.reloads == 0
        assert gw.snapshot is not None and gw.snapshot.generation == generation
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
            r = await client.get("/api/x")
            assert r.status_code == 200 and r.headers["x-config"] == "good"
            config.write_text(route_config(upstream, "fixed"))
            await wait_until(lambda: gw.reloads == 1, what="the fixed file to load")
            r = await client.get("/api/x")
            assert r.headers["x-config"] == "fixed"


async def test_sighup_reloads_a_running_process(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream, "one"))
        # Polling off: only the signal can make it reload.
        with GatewayProcess(config, env={"TOLLWAY_RELOAD_POLL_INTERVAL": "0"}) as gw:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
                assert (await client.get("/api/x")).headers["x-config"] == "one"
                config.write_text(route_config(upstream, "two"))
                assert gw.proc is not None
                os.kill(gw.proc.pid, signal.SIGHUP)

                async def reloaded() -> bool:
                    r = await client.get("/api/x")
                    return r.headers["x-config"] == "two"

                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                while not await reloaded():
                    assert loop.time() < deadline, "SIGHUP did not reload"
                    await asyncio.sleep(0.05)


async def test_workers_share_the_port_and_metrics_add_up(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream))
        with GatewayProcess(config, workers=2) as gw:
            assert gw.proc is not None
            metrics_dir = tmp_path / "data" / "metrics"
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 20

            def both_served() -> bool:
                # Each worker writes its own counter file once it counted a request.
                children = _children(gw.proc.pid)  # type: ignore[union-attr]
                return len(children) == 2 and all(
                    (metrics_dir / f"counter_{pid}.db").exists() for pid in children
                )

            total = 0
            # New connections each batch so that SO_REUSEPORT spreads them; a worker
            # still starting up gets its share once it listens.
            while not both_served():
                assert loop.time() < deadline, "one worker never served a request"
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as c:
                    rs = await asyncio.gather(*(c.get("/api/x") for _ in range(20)))
                assert all(r.status_code == 200 for r in rs)
                total += 20
                await asyncio.sleep(0.1)  # lets the workers' one-second flush run

            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gw.admin_port}"
            ) as admin:

                async def counted() -> float:
                    text = (await admin.get("/metrics")).text
                    return sum(
                        float(m.group(1))
                        for m in re.finditer(
                            r'^tollway_requests_total\{[^}]*route="api"[^}]*\} (\S+)$',
                            text, re.M,
                        )
                    )

                while (n := await counted()) < total:
                    assert loop.time() < deadline, f"metrics show {n} of {total} requests"
                    await asyncio.sleep(0.1)
                assert n == total


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


async def test_health_detailed_reports_each_upstream(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        dead = RecordingUpstream()
        await dead.start()
        dead_url = dead.url
        await dead.stop()  # a port where nothing listens now
        config = f"""
services:
  - name: up
    url: {upstream.url}
  - name: down
    url: {dead_url}
routes:
  - name: api
    service: up
    paths: [/api]
"""
        async with running_gateway(tmp_path, config) as gw, httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{gw.admin_port}"
        ) as admin:
            detailed = (await admin.get("/health/detailed")).json()
            services = detailed["checks"]["upstreams"]["details"]["services"]
            assert services["up"][f"127.0.0.1:{upstream.port}"]["status"] == "up"
            assert services["up"][f"127.0.0.1:{upstream.port}"]["latency_ms"] >= 0
            assert services["down"][dead_url.removeprefix("http://")]["status"] == "down"
            ready = await admin.get("/health/ready")
            assert ready.status_code == 200  # an upstream down does not unready the node


def access_log_config(upstream: RecordingUpstream, log: Path, comment: str = "") -> str:
    return f"""# {comment}
services:
  - name: up
    url: {upstream.url}
routes:
  - name: api
    service: up
    paths: [/api]
plugins:
  - name: access-log
    config: {{path: {log}}}
"""


async def test_successful_reload_reports_success(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, route_config(upstream, "one"), reload_poll_interval=0
    ) as gw:
        (tmp_path / "tollway.yaml").write_text(route_config(upstream, "two"))
        assert gw.reload() is True
        assert gw.snapshot is not None and gw.snapshot.generation == 2


async def test_an_emptied_file_does_not_wipe_the_routes(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream, running_gateway(
        tmp_path, route_config(upstream, "kept")
    ) as gw:
        (tmp_path / "tollway.yaml").write_text("")  # truncated mid-write, or a mistake
        await wait_until(lambda: gw.watcher is not None and gw.watcher.changes >= 1,
                         what="the watcher to see the empty file")
        assert gw.reloads == 0
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
            r = await client.get("/api/x")
        assert r.status_code == 200 and r.headers["x-config"] == "kept"


async def test_request_spanning_a_reload_is_still_logged(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    gate = Gate()
    async with RecordingUpstream(gate) as upstream, running_gateway(
        tmp_path, access_log_config(upstream, log), shutdown_timeout=0.2
    ) as gw, httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
        slow = asyncio.create_task(client.get("/api/slow", timeout=10))
        await wait_until(lambda: len(upstream.requests) == 1, what="the request upstream")
        (tmp_path / "tollway.yaml").write_text(access_log_config(upstream, log, "reloaded"))
        await wait_until(lambda: gw.reloads == 1, what="the reload")
        # Past the old snapshot's former close timer (shutdown_timeout + 1 s).
        plane = gw.plane
        assert plane is not None
        await wait_until(lambda: plane.sweeps > 20, what="sweeper ticks")
        gate.open.set()
        assert (await slow).status_code == 200
        await client.get("/api/after")
    paths = [json.loads(line)["path"] for line in log.read_text().splitlines()]
    assert "/api/slow" in paths and "/api/after" in paths


async def test_request_cut_at_shutdown_is_logged(tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    gate = Gate()  # never opened
    async with RecordingUpstream(gate) as upstream:
        async with running_gateway(
            tmp_path, access_log_config(upstream, log), shutdown_timeout=0.2
        ) as gw:
            client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}")
            cut = asyncio.create_task(client.get("/api/cut", timeout=10))
            await wait_until(lambda: len(upstream.requests) == 1, what="the request upstream")
        with pytest.raises(httpx.HTTPError):
            await cut
        await client.aclose()
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [(r["path"], r["aborted"]) for r in lines] == [("/api/cut", "shutdown_deadline")]


def _processes_serving(config: Path) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if str(config).encode() in args and b"serve" in args:
            found.append(int(cmdline.parent.name))
    return found


async def test_workers_never_outlive_a_parent_that_fails_to_start(tmp_path: Path) -> None:
    import socket

    async with RecordingUpstream() as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream))
        proc = GatewayProcess(config, workers=2)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", proc.admin_port))
            taken.listen()
            proc.spawn()
            assert await asyncio.to_thread(proc.wait, 30) == 1
        assert "address already in use" in proc.stderr()
        assert "Traceback" not in proc.stderr()
        # The parent could not serve its admin port; its workers went with it.
        await wait_until(lambda: not _processes_serving(config), what="the workers to exit")
        proc.kill()


async def test_errors_the_gateway_answers_are_counted_by_code(tmp_path: Path) -> None:
    async with RecordingUpstream() as upstream:
        config = tmp_path / "tollway.yaml"
        config.write_text(route_config(upstream))
        with GatewayProcess(config) as gw:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gw.port}") as client:
                for _ in range(3):
                    r = await client.get("/nowhere")
                    assert r.status_code == 404
                    assert r.json()["error"]["code"] == "route_not_found"
                assert (await client.get("/api/x")).status_code == 200
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{gw.admin_port}"
            ) as admin:

                async def errors() -> dict[str, float]:
                    text = (await admin.get("/metrics")).text
                    return {
                        m.group(1): float(m.group(2))
                        for m in re.finditer(
                            r'^tollway_gateway_errors_total\{code="([^"]+)"\} (\S+)$', text, re.M
                        )
                    }

                loop = asyncio.get_running_loop()
                deadline = loop.time() + 10
                # The worker flushes its counters once a second: wait for that flush.
                while (seen := await errors()).get("route_not_found", 0) < 3:
                    assert loop.time() < deadline, f"gateway errors in /metrics: {seen}"
                    await asyncio.sleep(0.1)
                # Exactly the three refusals: the proxied request is not an error.
                assert seen == {"route_not_found": 3.0}
