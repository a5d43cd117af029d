"""The change outbox: what caches in every worker and node must forget.

A change to a key, consumer, plan or limit grant writes a cache_invalidations row in the same
transaction as the change itself, so a committed change is never missed by the
workers that poll the outbox, and a rolled-back one leaves nothing behind. The
same changes are remembered on the session so that, after commit, the caller can
announce them at once (Redis pub/sub) with `pending_changes(session)`.
"""

from __future__ import annotations

from typing import Literal

from sqlalchemy.ext.asyncio import AsyncSession

from tollway.storage.models import CacheInvalidation

SESSION_KEY = "tollway_changes"

# key and consumer: ref is its id (the key cache). plan: ref is the plan's name;
# grant: ref is the consumer's id (the PlanBook, limits/plans.py).
ChangeKind = Literal["key", "consumer", "plan", "grant"]


def record_change(session: AsyncSession, kind: ChangeKind, ref: str) -> None:
    """Add an outbox row for (kind, ref) to the session's transaction, and remember it."""
    session.add(CacheInvalidation(kind=kind, ref=ref))
    changes: list[tuple[str, str]] = session.info.setdefault(SESSION_KEY, [])
    changes.append((kind, ref))


def pending_changes(session: AsyncSession) -> list[tuple[str, str]]:
    """The (kind, ref) changes recorded on this session, oldest first, without repeats.

    Not cleared by commit or rollback: announcing a change that was rolled back, or
    announcing one twice, only makes caches forget an entry they reload, which is
    harmless, while missing one is not.
    """
    changes: list[tuple[str, str]] = session.info.get(SESSION_KEY, [])
    return list(dict.fromkeys(changes))
