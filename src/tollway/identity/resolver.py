"""PLACEHOLDER (being written): raw API key -> key record, cached per worker."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tollway.settings import Settings
from tollway.storage.database import Database

if TYPE_CHECKING:
    from redis.asyncio import Redis


class KeyResolver:
    def __init__(
        self, database: Database, pepper: bytes, settings: Settings, redis: Redis | None
    ) -> None:
        self.database = database
        self.pepper = pepper
        self.settings = settings
        self.redis = redis

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None
