"""What the admin routers share: the runtime, one database session per request,
paging parameters, and commit-then-announce for every change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from tollway.identity.changes import pending_changes
from tollway.identity.invalidation import Announcer
from tollway.runtime import Runtime
from tollway.storage.pagination import MAX_LIMIT

ENVELOPE_DOC = {"description": "Error envelope (`responseStatus: error`)"}
ERRORS_DOC: dict[int | str, dict[str, str]] = {
    401: ENVELOPE_DOC,
    404: ENVELOPE_DOC,
    409: ENVELOPE_DOC,
    422: ENVELOPE_DOC,
}


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.tollway.runtime
    # The routers are mounted only when there is a runtime; this is a programming error.
    assert runtime is not None, "admin routers mounted without a runtime"
    return runtime


async def db_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One session per request; whatever a handler did not commit is rolled back."""
    async with runtime_of(request).database.sessions() as session:
        yield session


RuntimeDep = Annotated[Runtime, Depends(runtime_of)]
SessionDep = Annotated[AsyncSession, Depends(db_session)]
CursorQuery = Annotated[
    str | None, Query(max_length=512, description="`next_cursor` of the previous page")
]
LimitQuery = Annotated[
    int, Query(ge=1, description=f"Page size; larger values are capped at {MAX_LIMIT}")
]


async def commit_and_announce(session: AsyncSession, runtime: Runtime) -> None:
    """Commit the change, then tell every gateway's key cache to forget what changed.

    The change and its cache_invalidations outbox rows commit together, so a gateway
    that misses the Redis message still sees the change at its next outbox poll;
    Announcer never raises for that reason.
    """
    changes = pending_changes(session)
    await session.commit()
    await Announcer(runtime.redis).announce(changes)
