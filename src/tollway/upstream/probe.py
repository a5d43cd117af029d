"""A one-off reachability probe of upstream targets, for /health/detailed.

It opens (and closes) one TCP or unix connection per target and reports the
connect latency. The active and passive health checks that decide routing are the
upstreams issue's; this only answers "can this node reach it right now".
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from tollway.upstream.service import Service, Target


async def probe_target(target: Target, connect_timeout: float) -> dict[str, Any]:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(connect_timeout):
            if target.unix_path:
                _, writer = await asyncio.open_unix_connection(target.unix_path)
            else:
                _, writer = await asyncio.open_connection(target.host, target.port)
    except (OSError, TimeoutError) as exc:
        reason = "timeout" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        return {"status": "down", "error": reason}
    latency_ms = round((time.perf_counter() - start) * 1000, 3)
    writer.close()
    return {"status": "up", "latency_ms": latency_ms}


async def probe_services(
    services: dict[str, Service], connect_timeout: float = 1.0
) -> dict[str, Any]:
    """{service: {target: {status, latency_ms | error}}}, all probed concurrently."""
    pairs = [(svc.name, t) for svc in services.values() for t in svc.targets]
    results = await asyncio.gather(
        *(probe_target(t, min(connect_timeout, services[name].connect_timeout))
          for name, t in pairs)
    )
    report: dict[str, Any] = {}
    for (name, target), result in zip(pairs, results, strict=True):
        report.setdefault(name, {})[target.key] = result
    return report
