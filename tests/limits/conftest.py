"""Fixtures shared by the limit store tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from support.redis_server import shared_client


@pytest.fixture
async def redis() -> AsyncIterator[Redis]:
    """A client of the shared Redis, closed after the test."""
    client = await shared_client()
    try:
        yield client
    finally:
        await client.aclose()
