"""Listening on a Redis pub/sub subscription without trusting a quiet socket.

Bans, key-cache invalidations and shared circuit openings each keep one subscription
per process. A subscription that hears nothing cannot tell a quiet channel from a
dead connection (a half-open TCP socket stays silent forever), so `listen` sends a
PING every second and gives up after three silent seconds: the caller then
resubscribes and catches up from its own source of truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

PING_INTERVAL = 1.0
DEAD_AFTER = 3.0


def _always() -> bool:
    return True


async def listen(
    pubsub: Any,
    on_data: Callable[[bytes], None],
    running: Callable[[], bool] = _always,
) -> None:
    """Hand each message's data to `on_data` while `running()`; ConnectionError once
    Redis has been silent (no message, no PONG) for DEAD_AFTER seconds."""
    last_heard = last_ping = time.monotonic()
    while running():
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        now = time.monotonic()
        if message is not None:
            last_heard = now
            if message.get("type") == "message":
                on_data(message.get("data") or b"")
        if now - last_heard > DEAD_AFTER:
            raise ConnectionError("no answer from Redis")
        if now - last_ping >= PING_INTERVAL:
            last_ping = now
            await pubsub.ping()
