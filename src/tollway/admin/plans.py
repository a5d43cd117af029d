"""/plans: named sets of rate-limit windows; a user's `plan` names one.

Every change reaches every gateway's plan book within a second (the change and
its outbox row commit together; Redis and the in-process announcement are faster).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from tollway.admin.deps import (
    ERRORS_DOC,
    CursorQuery,
    LimitQuery,
    RuntimeDep,
    SessionDep,
    commit_and_announce,
)
from tollway.admin.schemas import PlanCreate, PlanList, PlanOut, PlanUpdate
from tollway.identity import plans
from tollway.limits.plans import NAME_MAX
from tollway.storage.pagination import DEFAULT_LIMIT

router = APIRouter(prefix="/plans", tags=["plans"], responses=ERRORS_DOC)

NamePath = Annotated[str, Path(min_length=1, max_length=NAME_MAX, description="The plan's name")]


@router.post("", status_code=201, response_model=PlanOut)
async def create_plan(body: PlanCreate, session: SessionDep, runtime: RuntimeDep) -> PlanOut:
    """Create a plan (409 when the name is taken)."""
    row = await plans.create_plan(
        session,
        name=body.name,
        limits=[w.model_dump(exclude_none=True) for w in body.limits],
        description=body.description,
    )
    await commit_and_announce(session, runtime)
    return PlanOut.of(row)


@router.get("", response_model=PlanList)
async def list_plans(
    session: SessionDep, cursor: CursorQuery = None, limit: LimitQuery = DEFAULT_LIMIT
) -> PlanList:
    """Plans, newest first, one page at a time."""
    page = await plans.list_plans(session, cursor=cursor, limit=limit)
    return PlanList(items=[PlanOut.of(p) for p in page.items], next_cursor=page.next_cursor)


@router.get("/{name}", response_model=PlanOut)
async def get_plan(name: NamePath, session: SessionDep) -> PlanOut:
    """One plan by name."""
    return PlanOut.of(await plans.get_plan(session, name))


@router.patch("/{name}", response_model=PlanOut)
async def update_plan(
    name: NamePath, body: PlanUpdate, session: SessionDep, runtime: RuntimeDep
) -> PlanOut:
    """Replace the windows and/or the description (the fields given)."""
    changes: dict[str, Any] = {}
    if "limits" in body.model_fields_set and body.limits is not None:
        changes["limits"] = [w.model_dump(exclude_none=True) for w in body.limits]
    if "description" in body.model_fields_set and body.description is not None:
        changes["description"] = body.description
    row = await plans.update_plan(session, name, **changes)
    await commit_and_announce(session, runtime)
    return PlanOut.of(row)


@router.delete("/{name}", status_code=204, response_class=Response)
async def delete_plan(name: NamePath, session: SessionDep, runtime: RuntimeDep) -> Response:
    """Delete a plan no user has (409 naming how many have it otherwise)."""
    await plans.delete_plan(session, name)
    await commit_and_announce(session, runtime)
    return Response(status_code=204)
