"""Health checks: liveness, readiness and a detailed report, over named async checks.

A check is an async callable that returns a details dict when its dependency is
usable and raises when it is not. Each run is timed and bounded by a timeout, so
one hung dependency makes its check "down" instead of hanging the probe.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tollway import __version__

CheckFn = Callable[[], Awaitable[dict[str, Any]]]

UP = "up"
DOWN = "down"


@dataclass(frozen=True, slots=True)
class _Check:
    fn: CheckFn
    required: bool
    timeout: float


class HealthRegistry:
    def __init__(
        self,
        *,
        version: str = __version__,
        workers: int = 1,
        default_timeout: float = 2.0,
    ) -> None:
        self._checks: dict[str, _Check] = {}
        self._config_loaded = False
        self._version = version
        self._workers = workers
        self._default_timeout = default_timeout
        self._started_monotonic = time.monotonic()
        self._started_at = datetime.now(UTC)

    def add_check(
        self,
        name: str,
        fn: CheckFn,
        required: bool,
        timeout: float | None = None,
    ) -> None:
        """Register (or replace) the check `name`; `required` checks gate readiness."""
        self._checks[name] = _Check(
            fn, required, self._default_timeout if timeout is None else timeout
        )

    def set_config_loaded(self, loaded: bool) -> None:
        self._config_loaded = loaded

    @property
    def config_loaded(self) -> bool:
        return self._config_loaded

    @property
    def check_names(self) -> list[str]:
        return list(self._checks)

    def uptime_seconds(self) -> float:
        return round(time.monotonic() - self._started_monotonic, 3)

    def process_info(self) -> dict[str, Any]:
        return {
            "version": self._version,
            "pid": os.getpid(),
            "workers": self._workers,
            "started_at": self._started_at.isoformat(),
            "uptime_seconds": self.uptime_seconds(),
        }

    async def live(self) -> dict[str, Any]:
        """The process answers: nothing else is checked (a liveness probe restarts)."""
        return {"status": UP, "uptime_seconds": self.uptime_seconds(), "pid": os.getpid()}

    async def ready(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the config is loaded and every required check passes."""
        results = await self._run({n: c for n, c in self._checks.items() if c.required})
        ok = self._config_loaded and all(r["status"] == UP for r in results.values())
        return ok, {
            "status": "ready" if ok else "not_ready",
            "config_loaded": self._config_loaded,
            "checks": results,
        }

    async def detailed(self) -> dict[str, Any]:
        """Every check, with the process facts an operator asks for first."""
        results = await self._run(self._checks)
        required_ok = all(r["status"] == UP for n, r in results.items() if self._checks[n].required)
        if not (self._config_loaded and required_ok):
            status = DOWN
        elif all(r["status"] == UP for r in results.values()):
            status = UP
        else:
            status = "degraded"
        return {
            "status": status,
            "config_loaded": self._config_loaded,
            **self.process_info(),
            "checks": results,
        }

    async def one(self, name: str) -> tuple[bool, dict[str, Any]] | None:
        """Run the check `name` alone; None when no such check is registered."""
        check = self._checks.get(name)
        if check is None:
            return None
        result = await self._run_one(check)
        return result["status"] == UP, {"name": name, **result}

    async def _run(self, checks: dict[str, _Check]) -> dict[str, dict[str, Any]]:
        # Concurrently: a probe's latency is the slowest check's, not their sum.
        results = await asyncio.gather(*(self._run_one(c) for c in checks.values()))
        return dict(zip(checks, results, strict=True))

    async def _run_one(self, check: _Check) -> dict[str, Any]:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(check.timeout):
                details = await check.fn()
        except TimeoutError:
            return self._result(DOWN, check, started, error=f"timed out after {check.timeout}s")
        # A check reports its dependency's failure by raising whatever that client
        # raises; any exception means "down", it must never fail the probe itself.
        except Exception as exc:  # noqa: BLE001
            return self._result(DOWN, check, started, error=f"{type(exc).__name__}: {exc}")
        return self._result(UP, check, started, details=details)

    @staticmethod
    def _result(
        status: str,
        check: _Check,
        started: float,
        *,
        details: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        result: dict[str, Any] = {
            "status": status,
            "required": check.required,
            "latency_ms": round((time.perf_counter() - started) * 1000, 3),
        }
        if details is not None:
            result["details"] = details
        if error is not None:
            result["error"] = error
        return result
