"""`tollway plans create/list/delete`, as an operator runs them against a data
directory (SQLite) or TOLLWAY_DATABASE_URL (PostgreSQL), with no server running."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from support.db import pg_fresh_database_url
from tollway.cli import app
from tollway.identity import consumers
from tollway.settings import Settings
from tollway.storage.database import Database, default_url

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"TOLLWAY_{name.upper()}", raising=False)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.needs_postgres),
    ]
)
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    base = {"TOLLWAY_DATA_DIR": str(tmp_path / "data")}
    if request.param == "sqlite":
        yield base
        return
    async with pg_fresh_database_url() as url:
        yield {**base, "TOLLWAY_DATABASE_URL": url}


async def tollway(env: dict[str, str], *args: str) -> Result:
    # The commands run their own event loop (asyncio.run), so not in the test's.
    return await asyncio.to_thread(runner.invoke, app, list(args), env=env)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def error_line(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


async def test_plans_from_the_command_line(env: dict[str, str]) -> None:
    made = await tollway(
        env,
        "plans",
        "create",
        "pro",
        "--window",
        "minute=60,burst=100",
        "--window",
        "day=1000",
        "--description",
        "Pro",
    )
    assert made.exit_code == 0, made.output
    assert "created plan" in made.stdout and "60/minute burst 100, 1000/day" in made.stdout
    free = as_json(await tollway(env, "plans", "create", "free", "--json"))
    assert free["limits"] == [] and free["name"] == "free"

    assert "a plan named 'pro' exists" in error_line(await tollway(env, "plans", "create", "pro"))
    assert "burst" in error_line(
        await tollway(env, "plans", "create", "x", "--window", "day=5,burst=9")
    )
    assert "--window" in error_line(
        await tollway(env, "plans", "create", "x", "--window", "lots"), 2
    )

    listed = as_json(await tollway(env, "plans", "list", "--json"))
    assert [p["name"] for p in listed["items"]] == ["free", "pro"]
    table = await tollway(env, "plans", "list")
    assert table.exit_code == 0 and "60/minute" in table.stdout

    # A user is created on an existing plan only; a refused one leaves nothing behind.
    refused = await tollway(env, "users", "create", "z@example.com", "--plan", "gold")
    assert refused.exit_code != 0 and "no plan named 'gold'" in error_line(refused)
    made_user = as_json(await tollway(env, "users", "create", "z@example.com", "--json"))
    assert made_user["created"] is True and made_user["plan"] is None

    data_dir = Path(env["TOLLWAY_DATA_DIR"])
    database = Database(env.get("TOLLWAY_DATABASE_URL") or default_url(data_dir))
    try:
        async with database.sessions() as s:
            await consumers.create_or_get(s, email="a@example.com", plan="pro")
            await s.commit()
    finally:
        await database.dispose()
    assert "1 user has plan 'pro'" in error_line(await tollway(env, "plans", "delete", "pro"))
    gone = await tollway(env, "plans", "delete", "free")
    assert gone.exit_code == 0 and "deleted plan free" in gone.stdout
    assert "no plan named 'free'" in error_line(await tollway(env, "plans", "delete", "free"))
