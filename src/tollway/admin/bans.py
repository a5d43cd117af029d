"""/bans: the sources abuse-detection (or an operator) banned for now.

GET lists the active bans, soonest to end first; POST bans a source by hand for
some seconds; DELETE /bans/{kind}/{value} lifts a ban (and forgets the source's
failure count). The store is the runtime's (`Runtime.bans`): with Redis it is the
one every worker and node reads, so a change here applies everywhere within a
moment. Without Redis each process has its own; under `--workers N` the admin
API (in the parent) cannot see the workers' bans, and says so (409) instead of
answering with an empty list.
"""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tollway.admin.deps import ERRORS_DOC, CursorQuery, RuntimeDep
from tollway.gateway.errors import GatewayError
from tollway.identity.errors import InvalidInput, NotFound
from tollway.limits.bans import MAX_VALUE_LENGTH, Ban, BanStore, BanStoreUnavailable
from tollway.runtime import Runtime

router = APIRouter(
    prefix="/bans",
    tags=["bans"],
    responses={**ERRORS_DOC, 503: {"description": "Error envelope (`responseStatus: error`)"}},
)

Kind = Literal["ip", "consumer"]
# Thirty days: longer is a block list, which ip-restriction keeps.
MAX_BAN_SECONDS = 30 * 24 * 3600
MAX_PAGE = 1000
DEFAULT_PAGE = 100


class BanOut(BaseModel):
    kind: Kind
    value: str
    reason: str
    until: datetime
    created_at: datetime
    retry_after: int = Field(description="Whole seconds left")
    strikes: int = Field(description="Automatic bans of this source in a row (0: manual)")

    @classmethod
    def of(cls, ban: Ban, now: float) -> BanOut:
        return cls(
            kind=ban.kind,
            value=ban.value,
            reason=ban.reason,
            until=datetime.fromtimestamp(ban.until, UTC),
            created_at=datetime.fromtimestamp(ban.created_at, UTC),
            retry_after=ban.retry_after(now),
            strikes=ban.strikes,
        )


class BanList(BaseModel):
    items: list[BanOut]
    next_cursor: str | None = Field(
        description="Pass as `cursor` for the next page; null at the end"
    )


class BanCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Kind
    value: str = Field(min_length=1, max_length=MAX_VALUE_LENGTH, examples=["203.0.113.7"])
    seconds: float = Field(gt=0, le=MAX_BAN_SECONDS)
    reason: str = Field(default="manual", max_length=200)

    @model_validator(mode="after")
    def _value(self) -> BanCreate:
        self.value = normalize_value(self.kind, self.value, strict=True)
        return self


class BanLifted(BaseModel):
    kind: Kind
    value: str
    lifted: bool


def normalize_value(kind: str, value: str, *, strict: bool) -> str:
    """An IP in the form the data plane bans it under (compressed; an IPv4-mapped
    IPv6 address as IPv4). `strict`: a value that is no IP is an error."""
    value = value.strip()
    if not value.isprintable():
        raise ValueError("must be printable")
    if kind != "ip":
        return value
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        if strict:
            raise ValueError(f"{value!r} is not an IP address") from None
        return value
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def store_of(runtime: Runtime) -> BanStore:
    store = runtime.bans
    if store is None:
        raise GatewayError(
            "service_unavailable", "Abuse bans are not set up in this process", status=503
        )
    if not store.shared and runtime.settings.workers > 1:
        raise GatewayError(
            "conflict",
            "Without Redis each worker keeps its own bans, out of the admin API's reach; "
            "set TOLLWAY_REDIS_URL to share them",
            status=409,
        )
    return store


def _unavailable(exc: BanStoreUnavailable) -> GatewayError:
    return GatewayError(
        "service_unavailable",
        "The ban store (Redis) cannot be reached; retry shortly",
        details={"error": str(exc)},
        status=503,
        headers=((b"retry-after", b"1"),),
    )


@router.get("", response_model=BanList)
async def list_bans(
    runtime: RuntimeDep,
    kind: Kind | None = None,
    cursor: CursorQuery = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = DEFAULT_PAGE,
) -> BanList:
    """Active bans, soonest to end first, one page at a time."""
    store = store_of(runtime)
    if cursor is not None and not (cursor.isdigit() and len(cursor) <= 9):
        raise InvalidInput("not a cursor this endpoint gave", field="cursor")
    offset = int(cursor or 0)
    try:
        bans = await store.list_bans(kind, offset, limit + 1)
    except BanStoreUnavailable as exc:
        raise _unavailable(exc) from exc
    now = store.clock()
    more = len(bans) > limit
    return BanList(
        items=[BanOut.of(b, now) for b in bans[:limit]],
        next_cursor=str(offset + limit) if more else None,
    )


@router.post("", status_code=201, response_model=BanOut)
async def create_ban(body: BanCreate, runtime: RuntimeDep) -> BanOut:
    """Ban a source for `seconds` (replacing a ban it has). Its requests get 403
    `temporarily_blocked` wherever abuse-detection is attached."""
    store = store_of(runtime)
    try:
        ban = await store.ban(body.kind, body.value, body.seconds, body.reason)
    except BanStoreUnavailable as exc:
        raise _unavailable(exc) from exc
    return BanOut.of(ban, store.clock())


@router.delete("/{kind}/{value:path}", response_model=BanLifted)
async def lift_ban(
    kind: Kind,
    value: Annotated[str, Path(min_length=1, max_length=MAX_VALUE_LENGTH)],
    runtime: RuntimeDep,
) -> BanLifted:
    """Lift a ban now (404 when the source is not banned)."""
    store = store_of(runtime)
    try:
        value = normalize_value(kind, value, strict=False)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="value") from None
    try:
        lifted = await store.lift(kind, value)
    except BanStoreUnavailable as exc:
        raise _unavailable(exc) from exc
    if not lifted:
        raise NotFound(f"No active {kind} ban for {value!r}", field="value")
    return BanLifted(kind=kind, value=value, lifted=True)
