"""The admin API on the admin port (8001): users, keys, plans, grants, usage, upstream
registrations, status, health, metrics.

Successful answers are plain JSON objects (probes and uptime checkers read /health
as is); every error, including a failed probe, uses the gateway's envelope.
Everything but /health*, /metrics, /docs and /openapi.json needs the admin token
(admin/auth.py says why those stay open). The users, keys, plans, grants, usage and
upstreams routers need the database, so they are mounted only when the app is given
a runtime.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request, Response, Security

from tollway import __version__
from tollway.admin import bans, grants, keys, plans, upstreams, usage, users
from tollway.admin.auth import AdminGuard, bearer_scheme
from tollway.admin.envelope import error_response, install_error_handlers, request_id_of
from tollway.admin.token import load_admin_token
from tollway.observability.health import DOWN, HealthRegistry
from tollway.settings import Settings

if TYPE_CHECKING:
    from tollway.config.schema import ServiceConfig
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
    # The bearer token every guarded route needs. None: read (or generated) from
    # the settings, as admin/token.py does; the gateway passes the one it printed.
    admin_token: str | None = None
    # The loaded snapshot's services by name, for /upstreams registrations (the
    # service must exist and have `registration: true`). None: not checked.
    service_configs: Callable[[], Mapping[str, ServiceConfig]] | None = None
    # This process's clusters (upstream/clusters.py): targets, health, breakers.
    upstreams: Callable[[], dict[str, Any]] | None = None


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
    token = state.admin_token or load_admin_token(state.settings).value
    app.add_middleware(AdminGuard, token=token)
    # Declares the bearer scheme on the guarded routes in /docs; AdminGuard checks it.
    guarded = [Security(bearer_scheme)]
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

    @app.get("/health/detailed", tags=["health"], responses={503: _ENVELOPE_DOC})
    async def health_detailed(request: Request) -> Any:
        """Every check with its status and latency, and the process facts.

        200 when up or degraded (an optional check failing); 503 when down (no config
        or a required check failing), the report in the envelope's details, so that a
        monitor pointed here sees the outage in the status code as /health/ready does.
        """
        body = await health.detailed()
        if body["status"] != DOWN:
            return body
        return error_response(
            503, "unhealthy", "The gateway is down", request_id_of(request), body
        )

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

    @app.get("/status", tags=["observability"], dependencies=guarded)
    async def status() -> dict[str, Any]:
        """The loaded config snapshot and this process."""
        return {"config": state.snapshot_info(), **health.process_info()}

    if state.runtime is not None:
        routers = (
            users.router,
            keys.router,
            usage.router,
            plans.router,
            grants.router,
            bans.router,
            upstreams.router,
        )
        for router in routers:
            app.include_router(router, dependencies=guarded)

    return app
