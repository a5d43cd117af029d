"""/upstreams/{service}/targets: targets that register themselves, with a TTL.

A target registers (POST), heart-beats before its TTL ends (POST .../heartbeat) and
deregisters when it shuts down (DELETE); one that stops heart-beating is dropped
when its TTL runs out. Every gateway reads the live registrations each second
(upstream/registrations.py), so a change reaches traffic without a reload.

The service must be in the loaded config with `registration: true`, so that a
typo'd service name or a service that did not opt in cannot gain targets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, HTTPException, Path, Request, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tollway.admin.deps import ERRORS_DOC, RuntimeDep
from tollway.config.schema import ServiceConfig
from tollway.config.schema_base import Duration
from tollway.identity.errors import InvalidInput
from tollway.upstream.registrations import (
    MAX_TAG_LENGTH,
    MAX_TAGS,
    MAX_WEIGHT,
    Registration,
    RegistrationStore,
    canonical_target,
)

router = APIRouter(prefix="/upstreams", tags=["upstreams"], responses=ERRORS_DOC)

DEFAULT_TTL = 30.0
MIN_TTL = 1.0
MAX_TTL = 86400.0

ServicePath = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._~-]{0,127}$",
        description="A service of the loaded config with `registration: true`",
    ),
]
TargetPath = Annotated[
    str, Path(min_length=1, max_length=300, description='"host:port" ("[v6]:port")')
]
Tag = Annotated[str, Field(min_length=1, max_length=MAX_TAG_LENGTH)]


def _ttl_in_bounds(value: float) -> float:
    if not math.isfinite(value) or not MIN_TTL <= value <= MAX_TTL:
        raise ValueError(f"must be from {MIN_TTL:g} s to {MAX_TTL:g} s (1 day)")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TargetRegister(_Request):
    target: str = Field(min_length=1, max_length=300, examples=["127.0.0.1:9001"])
    ttl: Duration = Field(
        default=DEFAULT_TTL, description='Seconds, or a duration such as "30s"', examples=["30s"]
    )
    weight: int = Field(default=100, ge=0, le=MAX_WEIGHT)
    tags: list[Tag] = Field(default_factory=list, max_length=MAX_TAGS)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return canonical_target(v)

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float) -> float:
        return _ttl_in_bounds(v)


class TargetHeartbeat(_Request):
    ttl: Duration | None = Field(
        default=None, description="A new TTL; the registration's own when left out"
    )

    @field_validator("ttl")
    @classmethod
    def _ttl(cls, v: float | None) -> float | None:
        return None if v is None else _ttl_in_bounds(v)


class TargetOut(BaseModel):
    service: str
    target: str
    weight: int
    tags: list[str]
    ttl_seconds: float
    expires_at: datetime
    registered_at: datetime

    @classmethod
    def of(cls, reg: Registration) -> TargetOut:
        return cls(
            service=reg.service,
            target=reg.target,
            weight=reg.weight,
            tags=list(reg.tags),
            ttl_seconds=reg.ttl_seconds,
            expires_at=reg.expires_at,
            registered_at=reg.registered_at,
        )


class TargetList(BaseModel):
    data: list[TargetOut]


def registration_store(runtime: RuntimeDep) -> RegistrationStore:
    """The store over the runtime's database (a dependency tests may override)."""
    return RegistrationStore(runtime.database)


def registrable_service(service: ServicePath, request: Request) -> str:
    """The service, when the loaded config has it with `registration: true`."""
    configs_of = request.app.state.tollway.service_configs
    if configs_of is None:  # no config to check against (bare admin app)
        return service
    configs: Mapping[str, ServiceConfig] = configs_of()
    config = configs.get(service)
    if config is None:
        raise HTTPException(
            404,
            {"code": "service_not_found", "message": f"No service named {service!r}"},
        )
    if not config.registration:
        raise HTTPException(
            409,
            {
                "code": "registration_disabled",
                "message": (
                    f"Service {service!r} does not take registrations: "
                    "set `registration: true` on it in the config"
                ),
            },
        )
    return service


StoreDep = Annotated[RegistrationStore, Depends(registration_store)]
ServiceDep = Annotated[str, Depends(registrable_service)]


def _path_target(target: str) -> str:
    try:
        return canonical_target(target)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="target") from None


def _not_found(service: str, target: str) -> HTTPException:
    return HTTPException(
        404,
        {
            "code": "target_not_found",
            "message": f"{target} is not registered for {service!r} (or its TTL ran out)",
        },
    )


@router.post(
    "/{service}/targets",
    status_code=201,
    response_model=TargetOut,
    responses={200: {"description": "An existing registration, refreshed"}},
)
async def register_target(
    service: ServiceDep, body: TargetRegister, store: StoreDep, response: Response
) -> TargetOut:
    """Register a target (201), or refresh its registration (200): its TTL starts
    again and it takes the weight and tags given."""
    reg, created = await store.register(
        service, body.target, body.ttl, weight=body.weight, tags=tuple(body.tags)
    )
    response.status_code = 201 if created else 200
    return TargetOut.of(reg)


@router.post("/{service}/targets/{target}/heartbeat", response_model=TargetOut)
async def heartbeat_target(
    service: ServiceDep,
    target: TargetPath,
    store: StoreDep,
    body: Annotated[TargetHeartbeat | None, Body()] = None,
) -> TargetOut:
    """Keep a registration alive for another TTL (its own, or `ttl` when given).
    404 when it is unknown or already expired: register again."""
    key = _path_target(target)
    reg = await store.heartbeat(service, key, None if body is None else body.ttl)
    if reg is None:
        raise _not_found(service, key)
    return TargetOut.of(reg)


@router.delete("/{service}/targets/{target}", status_code=204, response_class=Response)
async def deregister_target(
    service: ServiceDep, target: TargetPath, store: StoreDep
) -> Response:
    """Remove a registration now (a target shutting down)."""
    key = _path_target(target)
    if not await store.deregister(service, key):
        raise _not_found(service, key)
    return Response(status_code=204)


@router.get("/{service}/targets", response_model=TargetList)
async def list_targets(service: ServiceDep, store: StoreDep) -> TargetList:
    """The live registrations of the service."""
    return TargetList(data=[TargetOut.of(r) for r in await store.live(service)])


# ---- the live state: balancer, targets, health, circuits, retry budget --------------


def _states(request: Request) -> dict[str, Any]:
    upstreams = request.app.state.tollway.upstreams
    return {} if upstreams is None else dict(upstreams())


@router.get("")
async def list_upstreams(request: Request) -> dict[str, Any]:
    """Every service of this gateway process: its balancer, the service circuit, the
    retry budget, and each target with where it came from (config, dns,
    registration), whether it takes traffic now, its health (active checks and
    outlier ejections) and its circuit. With `--workers N` this is the admin
    process's view: its own active checks, and the circuits other processes opened
    when Redis shares them; each worker keeps its own passive health (every process
    runs its own active checks)."""
    return {"data": _states(request)}


@router.get("/{service}")
async def get_upstream(service: ServicePath, request: Request) -> dict[str, Any]:
    """One service's live state (see GET /upstreams)."""
    state = _states(request).get(service)
    if state is None:
        raise HTTPException(
            404, {"code": "service_not_found", "message": f"No service named {service!r}"}
        )
    return {"service": service, **state}
