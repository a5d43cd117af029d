"""A real gateway with its admin API, on SQLite or PostgreSQL, and an HTTP client for it.

A plain module (not conftest.py) with a unique name, so that `from admin_helpers
import` cannot pick up another directory's helpers.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from support.db import pg_fresh_database_url
from support.gateway import api_config, running_gateway
from tollway.gateway.app import Gateway

TOKEN = "admin-test-token-5f0c2a9e"
AUTH = {"authorization": f"Bearer {TOKEN}"}

BACKENDS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.needs_postgres),
]


@dataclass
class AdminApi:
    gateway: Gateway
    client: httpx.AsyncClient  # sends the admin token
    anonymous: httpx.AsyncClient  # sends none
    backend: str

    async def user(self, email: str, **fields: Any) -> dict[str, Any]:
        r = await self.client.post("/users", json={"email": email, **fields})
        assert r.status_code in (200, 201), r.text
        return dict(r.json())

    async def key(self, user_id: str, **fields: Any) -> dict[str, Any]:
        r = await self.client.post("/keys", json={"user_id": user_id, **fields})
        assert r.status_code == 201, r.text
        return dict(r.json())


@asynccontextmanager
async def admin_api(
    tmp_path: Path, backend: str, **settings: Any
) -> AsyncIterator[AdminApi]:
    """A gateway (same loop as the test) and clients for its admin port."""
    async with _database_settings(backend) as db_settings:
        values = {"admin_token": TOKEN, **db_settings, **settings}
        # The proxy side is not used; its upstream is never called.
        config = api_config("http://127.0.0.1:9")
        async with running_gateway(tmp_path, config, **values) as gateway:
            base = f"http://127.0.0.1:{gateway.admin_port}"
            async with (
                httpx.AsyncClient(base_url=base, headers=AUTH, timeout=15) as client,
                httpx.AsyncClient(base_url=base, timeout=15) as anonymous,
            ):
                yield AdminApi(gateway, client, anonymous, backend)


@asynccontextmanager
async def _database_settings(backend: str) -> AsyncIterator[dict[str, Any]]:
    if backend == "sqlite":
        yield {}
        return
    async with pg_fresh_database_url() as url:
        yield {"database_url": url}


def assert_envelope(body: dict[str, Any], code: str) -> None:
    assert body["responseStatus"] == "error", body
    assert body["data"] is None
    assert body["error"]["code"] == code, body
    assert isinstance(body["message"], str) and body["message"]
    assert body["requestId"]


def fields_of(body: dict[str, Any]) -> set[str]:
    """The field paths a 422 envelope names."""
    return {d["field"] for d in body["error"]["details"]}
