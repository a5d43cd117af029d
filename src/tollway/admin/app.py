"""The admin API: metrics, health probes and status, on the admin port (8001).

Successful /health answers are plain JSON objects (probes and uptime checkers read
them as is); every error, including a failed probe, uses the gateway's envelope.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response

from tollway import __version__
from tollway.admin.envelope import error_response, install_error_handlers, request_id_of
from tollway.observability.health import HealthRegistry
from tollway.settings import Settings

if TYPE_CHECKING:
    from tollway.runtime import Runtime

_ENVELOPE_DOC = {"description": "Error envelope (`responseStatus: error`)"}


@dataclass(slots=True)
class AdminState:
    settings: Settings
    health: HealthRegistry
    # Returns (exposition body, content type); see observability.metrics.
    metrics_render: Callable[[], tuple[bytes, str]]
    # The loaded config snapshot: version/generation, loaded_at, counts.
    snapshot_info: Callable[[], dict[str, Any]]
    # Database and shared services; None only in tests of the bare admin app.
    runtime: Runtime | None = None


def create_admin_app(state: AdminState) -> FastAPI:
    app = FastAPI(
        title="Tollway admin",
        version=__version__,
        docs_url="/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.tollway = state
    install_error_handlers(app)
    health = state.health

    @app.get("/metrics", tags=["observability"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus exposition, summed across all workers."""
        body, content_type = state.metrics_render()
        return Response(content=body, headers={"content-type": content_type})

    @app.get("/health", tags=["health"])
    async def health_basic() -> dict[str, Any]:
        """Basic uptime check: the admin API answers."""
        return {
            "status": "ok",
            "version": __version__,
            "uptime_seconds": health.uptime_seconds(),
            "timestamp": datetime.now(UTC).isoformat(),
        }

    @app.get("/health/live", tags=["health"])
    async def health_live() -> dict[str, Any]:
        """Liveness: the process is running and its event loop answers."""
        return await health.live()

    @app.get("/health/ready", tags=["health"], responses={503: _ENVELOPE_DOC})
    async def health_ready(request: Request) -> Any:
        """Readiness: the config is loaded and every required check passes."""
        ok, body = await health.ready()
        if ok:
            return body
        return error_response(
            503, "not_ready", "The gateway is not ready", request_id_of(request), body
        )

    @app.get("/health/detailed", tags=["health"])
    async def health_detailed() -> dict[str, Any]:
        """Every check with its status and latency, and the process facts."""
        return await health.detailed()

    @app.get("/health/{name}", tags=["health"], responses={404: _ENVELOPE_DOC, 503: _ENVELOPE_DOC})
    async def health_one(name: str, request: Request) -> Any:
        """One named check (e.g. redis, db, auth)."""
        result = await health.one(name)
        if result is None:
            return error_response(
                404,
                "not_found",
                f"No health check named {name!r}",
                request_id_of(request),
                {"available": health.check_names},
            )
        ok, body = result
        if ok:
            return body
        return error_response(
            503, "health_check_failed", f"{name} is down", request_id_of(request), body
        )

    @app.get("/status", tags=["observability"])
    async def status() -> dict[str, Any]:
        """The loaded config snapshot and this process."""
        return {"config": state.snapshot_info(), **health.process_info()}

    return app
