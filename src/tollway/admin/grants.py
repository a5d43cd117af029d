"""/users/{user_id}/grants: temporary extra allowance in one window of a user's plan.

A grant adds `extra` to the user's `per` window (limit, or GCRA burst) until it
expires (at most 31 days ahead) or is revoked. Changes reach every gateway within a
second, as plan changes do.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from tollway.admin.deps import (
    ERRORS_DOC,
    CursorQuery,
    LimitQuery,
    RuntimeDep,
    SessionDep,
    commit_and_announce,
)
from tollway.admin.schemas import GrantCreate, GrantList, GrantOut
from tollway.identity import plans
from tollway.identity.errors import InvalidInput
from tollway.storage.models import utcnow
from tollway.storage.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/users/{user_id}/grants", tags=["grants"], responses=ERRORS_DOC)


@router.post("", status_code=201, response_model=GrantOut)
async def create_grant(
    user_id: uuid.UUID, body: GrantCreate, session: SessionDep, runtime: RuntimeDep
) -> GrantOut:
    """Grant `extra` more in the user's `per` window until `expires_at` (or for
    `ttl_seconds`)."""
    now = utcnow()
    if (body.expires_at is None) == (body.ttl_seconds is None):
        raise InvalidInput("give either expires_at or ttl_seconds", field="expires_at")
    if body.ttl_seconds is not None:
        expires_at = now + timedelta(seconds=body.ttl_seconds)
    else:
        assert body.expires_at is not None
        expires_at = body.expires_at
    row = await plans.create_grant(
        session,
        user_id,
        per=body.per,
        extra=body.extra,
        expires_at=expires_at,
        reason=body.reason,
        now=now,
    )
    await commit_and_announce(session, runtime)
    return GrantOut.of(row, now)


@router.get("", response_model=GrantList)
async def list_grants(
    user_id: uuid.UUID,
    session: SessionDep,
    include_all: Annotated[
        bool, Query(alias="all", description="Include revoked and expired grants")
    ] = False,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> GrantList:
    """The user's active grants (all of them with `all=true`), newest first."""
    now = utcnow()
    page = await plans.list_grants(
        session, user_id, include_inactive=include_all, cursor=cursor, limit=limit, now=now
    )
    return GrantList(items=[GrantOut.of(g, now) for g in page.items], next_cursor=page.next_cursor)


@router.delete("/{grant_id}", response_model=GrantOut)
async def revoke_grant(
    user_id: uuid.UUID, grant_id: uuid.UUID, session: SessionDep, runtime: RuntimeDep
) -> GrantOut:
    """End the grant now. The record stays (with `revoked_at`)."""
    row = await plans.revoke_grant(session, user_id, grant_id)
    await commit_and_announce(session, runtime)
    return GrantOut.of(row, utcnow())
