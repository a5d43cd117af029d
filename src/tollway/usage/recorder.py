"""PLACEHOLDER (being written): the bounded queue that writes usage records."""

from __future__ import annotations

from tollway.settings import Settings
from tollway.storage.database import Database


class UsageRecorder:
    def __init__(self, database: Database, settings: Settings) -> None:
        self.database = database
        self.settings = settings

    def start(self) -> None:
        return None

    async def stop(self, grace: float) -> None:
        return None
