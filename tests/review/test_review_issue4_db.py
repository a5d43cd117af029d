"""Review of issue 4: identity races and secrets in database error messages.

Runs on SQLite and PostgreSQL (the `database` fixture).
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from tollway.identity import consumers, keys
from tollway.identity.apikeys import generate_key, hash_key
from tollway.identity.errors import Conflict
from tollway.storage.database import Database
from tollway.storage.models import ApiKey, ApiKeySecret

PEPPER = b"review-pepper"


async def test_a_key_created_while_its_user_is_deleted_is_not_left_active(
    database: Database,
) -> None:
    """DELETE /users promises that every key of the user is revoked. A POST /keys
    racing it must not leave an active key behind (which a later PATCH status=active
    of the user would bring back to life)."""
    async with database.sessions() as session:
        consumer, _ = await consumers.create_or_get(session, email="race@example.com")
        await session.commit()

    async with database.sessions() as deleting:
        # The delete has run its statements but not committed yet...
        await consumers.disable_consumer(deleting, consumer.id)

        async def create() -> str:
            async with database.sessions() as creating:
                try:
                    await keys.create_key(creating, PEPPER, consumer_id=consumer.id)
                    await creating.commit()
                except Conflict:
                    return "conflict"
                return "created"

        # ...when a key is created for the same user.
        creation = asyncio.create_task(create())
        await asyncio.sleep(0.3)  # let it reach the database and wait there, if it waits
        await deleting.commit()
        outcome = await asyncio.wait_for(creation, 15)

    async with database.sessions() as session:
        statuses = list((await session.scalars(
            select(ApiKey.status).where(ApiKey.consumer_id == consumer.id)
        )).all())
    assert "active" not in statuses, (outcome, statuses)
    assert outcome == "conflict"


async def test_a_failed_statement_does_not_carry_a_key_hash_into_logs(
    database: Database,
) -> None:
    """Error messages of failed statements end up in logs (uvicorn's traceback, the
    writers' `error=` fields). They must not quote bound values: key hashes, emails."""
    secret_hash = hash_key(PEPPER, generate_key())
    async with database.sessions() as session:
        import uuid

        session.add(ApiKeySecret(hash=secret_hash, key_id=uuid.uuid4()))  # no such key
        with pytest.raises(IntegrityError) as caught:
            await session.flush()
    assert secret_hash not in str(caught.value)
    assert secret_hash not in repr(caught.value)
