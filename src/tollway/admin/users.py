"""/users: the people (consumers) who call the gateway."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from fastapi import APIRouter, Query, Response

from tollway.admin.deps import (
    ERRORS_DOC,
    CursorQuery,
    LimitQuery,
    RuntimeDep,
    SessionDep,
    commit_and_announce,
)
from tollway.admin.schemas import Email, UserCreate, UserList, UserOut, UserStatus, UserUpdate
from tollway.identity import consumers, plans
from tollway.storage.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/users", tags=["users"], responses=ERRORS_DOC)


@router.post(
    "",
    status_code=201,
    response_model=UserOut,
    responses={200: {"model": UserOut, "description": "A user with this email already exists"}},
)
async def create_user(
    body: UserCreate, response: Response, session: SessionDep, runtime: RuntimeDep
) -> UserOut:
    """Create a user, or return the one with this email (201 created, 200 existing).

    Existing users are returned as they are: name, plan and metadata given here do
    not overwrite theirs (PATCH does that). A `plan` must name an existing plan (422
    otherwise, and no user is created).
    """
    consumer, created = await consumers.create_or_get(
        session, email=body.email, name=body.name, plan=body.plan, metadata=body.metadata
    )
    if created and body.plan is not None:
        # After the insert, as PATCH does (see update_user): the plan is held until
        # the commit. A refusal rolls the new user back with the session.
        await plans.require_plan(session, body.plan)
    await commit_and_announce(session, runtime)
    if not created:
        response.status_code = 200
    return UserOut.of(consumer)


@router.get("/by-email", response_model=UserOut)
async def get_user_by_email(
    email: Annotated[Email, Query(description="Matched after trimming and lower-casing")],
    session: SessionDep,
) -> UserOut:
    """The user with this email (404 if none)."""
    return UserOut.of(await consumers.get_by_email(session, email))


@router.get("/{id}", response_model=UserOut)
async def get_user(id: uuid.UUID, session: SessionDep) -> UserOut:
    """One user by id."""
    return UserOut.of(await consumers.get_consumer(session, id))


@router.get("", response_model=UserList)
async def list_users(
    session: SessionDep,
    email: Annotated[str | None, Query(max_length=320, description="Exact email")] = None,
    status: UserStatus | None = None,
    cursor: CursorQuery = None,
    limit: LimitQuery = DEFAULT_LIMIT,
) -> UserList:
    """Users, newest first, one page at a time."""
    page = await consumers.list_consumers(
        session, email=email, status=status, cursor=cursor, limit=limit
    )
    return UserList(items=[UserOut.of(c) for c in page.items], next_cursor=page.next_cursor)


@router.patch("/{id}", response_model=UserOut)
async def update_user(
    id: uuid.UUID,
    body: UserUpdate,
    session: SessionDep,
    runtime: RuntimeDep,
) -> UserOut:
    """Change the fields given. Disabling here does not touch the user's keys
    (their requests are refused while the user is disabled); DELETE revokes them.
    A `plan` must name an existing plan (422 otherwise)."""
    changes: dict[str, Any] = {name: getattr(body, name) for name in body.model_fields_set}
    consumer = await consumers.update_consumer(session, id, **changes)
    if changes.get("plan") is not None and consumer.plan is not None:
        # After the update, not before: see identity/plans.py (a plan deleted at the
        # same moment cannot slip between the check and the commit). 422 on body.plan.
        await plans.require_plan(session, consumer.plan)
    await commit_and_announce(session, runtime)
    return UserOut.of(consumer)


@router.delete("/{id}", response_model=UserOut)
async def delete_user(id: uuid.UUID, session: SessionDep, runtime: RuntimeDep) -> UserOut:
    """Disable the user and revoke every key of theirs. Nothing is erased: the
    record, the keys and the usage history stay."""
    consumer = await consumers.disable_consumer(session, id)
    await commit_and_announce(session, runtime)
    return UserOut.of(consumer)
