"""The quickstart's demo user and key, so that `make run` shows key-auth working.

Each quickstart start revokes the previous quickstart key and makes a new one
(a raw key is shown once and never stored), then prints it in the panel.
"""

from __future__ import annotations

from sqlalchemy import select

from tollway.identity import consumers, keys
from tollway.identity.apikeys import load_pepper
from tollway.identity.pepper import verify_pepper
from tollway.runtime import database_for
from tollway.settings import Settings
from tollway.storage.migrate import upgrade
from tollway.storage.models import ApiKey

DEMO_EMAIL = "demo@tollway.local"
DEMO_KEY_NAME = "quickstart"


async def demo_key(settings: Settings) -> str:
    """Migrate the database and return a fresh raw key for the demo user."""
    database = database_for(settings)
    try:
        await upgrade(database)
        pepper = load_pepper(
            settings.key_pepper.get_secret_value() if settings.key_pepper else None,
            settings.data_dir,
        )
        await verify_pepper(database, pepper)
        async with database.sessions() as session:
            user, _ = await consumers.create_or_get(session, email=DEMO_EMAIL, name="Demo")
            old = await session.scalars(
                select(ApiKey.id).where(
                    ApiKey.consumer_id == user.id,
                    ApiKey.name == DEMO_KEY_NAME,
                    ApiKey.status != "revoked",
                )
            )
            for key_id in old.all():
                await keys.revoke_key(session, key_id)
            new = await keys.create_key(
                session, pepper, consumer_id=user.id, name=DEMO_KEY_NAME
            )
            await session.commit()
        return new.raw
    finally:
        await database.dispose()
