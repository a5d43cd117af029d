"""One pepper per database: every process that shares it must hash keys alike.

The pepper never goes into the database (a dump alone must not allow checking
guessed keys), but a fingerprint of it does: HMAC-SHA256(pepper, a fixed label).
The first process to start records it; a later process with another pepper is
refused with a message that says what to set, rather than starting and answering
401 to every key the others created.
"""

from __future__ import annotations

import hashlib
import hmac

from sqlalchemy import select

from tollway.identity.apikeys import PepperError
from tollway.storage.database import Database, insert_for
from tollway.storage.models import InstanceSetting

SETTING = "key_pepper_fingerprint"
_LABEL = b"tollway key pepper fingerprint v1"


class PepperMismatch(PepperError):
    """This process's key pepper is not the one the database's keys were made with."""


def fingerprint(pepper: bytes) -> str:
    return hmac.new(pepper, _LABEL, hashlib.sha256).hexdigest()


async def verify_pepper(database: Database, pepper: bytes) -> None:
    """Record the pepper's fingerprint on first use; raise PepperMismatch if it differs."""
    mine = fingerprint(pepper)
    async with database.sessions() as session:
        # Insert-if-absent, then read: two nodes starting at once agree on one value.
        await session.execute(
            insert_for(database.dialect, InstanceSetting)
            .values(name=SETTING, value=mine)
            .on_conflict_do_nothing(index_elements=["name"])
        )
        stored = await session.scalar(
            select(InstanceSetting.value).where(InstanceSetting.name == SETTING)
        )
        await session.commit()
    if stored is not None and not hmac.compare_digest(stored, mine):
        raise PepperMismatch(
            "this database's API keys were made with a different key pepper: set "
            "TOLLWAY_KEY_PEPPER to the pepper the other gateways use (or copy their "
            "data directory's key_pepper file here)"
        )
