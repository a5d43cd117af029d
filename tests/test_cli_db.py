"""The database commands of `tollway` (migrate, users, keys, usage, admin-token), as an
operator runs them: against a data directory (SQLite) or TOLLWAY_DATABASE_URL
(PostgreSQL), with no server running."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result
from typer.testing import CliRunner

from support.db import pg_fresh_database_url
from support.gateway import free_port
from tollway.cli import app
from tollway.identity.apikeys import hash_key, is_well_formed, load_pepper
from tollway.identity.keys import lookup_secret
from tollway.settings import Settings
from tollway.storage.database import Database, default_url

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"TOLLWAY_{name.upper()}", raising=False)


def tollway(env: dict[str, str], *args: str) -> Result:
    return runner.invoke(app, list(args), env=env)


async def atollway(env: dict[str, str], *args: str) -> Result:
    # The commands run their own event loop (asyncio.run), so not in the test's.
    return await asyncio.to_thread(tollway, env, *args)


def as_json(result: Result) -> Any:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result: Result, code: int = 1) -> str:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture(params=[
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgres", id="postgres", marks=pytest.mark.needs_postgres),
])
async def env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[dict[str, str]]:
    base = {"TOLLWAY_DATA_DIR": str(tmp_path / "data")}
    if request.param == "sqlite":
        yield base
        return
    async with pg_fresh_database_url() as url:
        yield {**base, "TOLLWAY_DATABASE_URL": url}


def database_of(env: dict[str, str]) -> Database:
    data_dir = Path(env["TOLLWAY_DATA_DIR"])
    return Database(env.get("TOLLWAY_DATABASE_URL") or default_url(data_dir))


async def test_migrate_and_check(env: dict[str, str]) -> None:
    behind = await atollway(env, "migrate", "--check")
    message = one_line_error(behind)
    assert "behind" in message and "run `tollway migrate`" in message

    done = await atollway(env, "migrate")
    assert done.exit_code == 0, done.output
    assert "up to date" in done.stdout
    checked = await atollway(env, "migrate", "--check")
    assert checked.exit_code == 0, checked.output
    assert "up to date" in checked.stdout
    # Migrating again is a no-op.
    assert (await atollway(env, "migrate")).exit_code == 0


async def test_users_and_keys_from_the_command_line(env: dict[str, str]) -> None:
    # No `migrate` first: every command brings the schema up to date itself. A user's
    # plan must exist (test_plans_cli checks the refusal).
    assert (await atollway(env, "plans", "create", "pro")).exit_code == 0
    created = await atollway(env, "users", "create", "Ada@Example.com", "--name", "Ada",
                             "--plan", "pro")
    assert created.exit_code == 0, created.output
    assert "created user" in created.stdout and "ada@example.com" in created.stdout
    again = as_json(await atollway(env, "users", "create", "ada@example.com", "--json"))
    assert again["created"] is False and again["plan"] == "pro"
    ada_id = again["id"]
    assert ada_id in created.stdout
    await atollway(env, "users", "create", "bob@example.com")

    listed = await atollway(env, "users", "list")
    assert listed.exit_code == 0
    assert ada_id in listed.stdout and "bob@example.com" in listed.stdout
    only = as_json(await atollway(env, "users", "list", "--email", "ADA@example.com", "--json"))
    assert [u["id"] for u in only["items"]] == [ada_id]

    made = await atollway(env, "keys", "create", "ada@example.com", "--name", "ci",
                          "--per-minute", "60", "--per-day", "1000", "--scope", "images",
                          "--scope", "tag:beta", "--expires", "30d")
    assert made.exit_code == 0, made.output
    raw = made.stdout.strip().splitlines()[-1]
    assert is_well_formed(raw)
    assert "Store it now" in made.stderr
    keys = as_json(await atollway(env, "keys", "list", "--user", ada_id, "--json"))["items"]
    [key] = keys
    assert raw.startswith(key["prefix"])
    assert (key["name"], key["limit_per_minute"], key["limit_per_day"]) == ("ci", 60, 1000)
    assert key["scopes"] == ["images", "tag:beta"]
    expires = datetime.fromisoformat(key["expires_at"])
    assert abs(expires - (datetime.now(UTC) + timedelta(days=30))) < timedelta(minutes=1)
    table = await atollway(env, "keys", "list")
    assert key["id"] in table.stdout and "ada@example.com" in table.stdout
    assert raw not in table.stdout

    # The key the CLI printed is the one the gateway will find (same pepper, same rows).
    data_dir = Path(env["TOLLWAY_DATA_DIR"])
    pepper = load_pepper(None, data_dir)
    database = database_of(env)
    try:
        async with database.sessions() as session:
            found = await lookup_secret(session, hash_key(pepper, raw), datetime.now(UTC))
        assert found is not None and str(found.key_id) == key["id"]
    finally:
        await database.dispose()

    disabled = await atollway(env, "keys", "disable", key["id"])
    assert disabled.exit_code == 0, disabled.output
    assert "disabled" in disabled.stdout
    enabled = as_json(await atollway(env, "keys", "enable", key["id"], "--json"))
    assert enabled["status"] == "active"

    rotated = await atollway(env, "keys", "rotate", key["id"], "--grace", "1h")
    assert rotated.exit_code == 0, rotated.output
    new_raw = rotated.stdout.strip().splitlines()[-1]
    assert is_well_formed(new_raw) and new_raw != raw
    assert "previous secret works until" in rotated.stderr
    again_rotated = as_json(await atollway(env, "keys", "rotate", key["id"], "--grace", "0",
                                           "--json"))
    assert is_well_formed(again_rotated["key"]) and again_rotated["key"] != new_raw
    stops = datetime.fromisoformat(again_rotated["previous_expires_at"])
    assert stops <= datetime.now(UTC)

    report = await atollway(env, "usage", key["id"], "--from", "7d", "--group-by", "day")
    assert report.exit_code == 0, report.output
    assert "requests" in report.stdout
    report_json = as_json(await atollway(env, "usage", key["id"], "--json"))
    assert report_json["totals"]["requests"] == 0 and report_json["key_id"] == key["id"]

    gone = await atollway(env, "users", "disable", "ada@example.com")
    assert gone.exit_code == 0, gone.output
    assert "revoked 1 key(s)" in gone.stdout
    keys = as_json(await atollway(env, "keys", "list", "--user", "ada@example.com", "--json"))
    assert [k["status"] for k in keys["items"]] == ["revoked"]
    bob = as_json(await atollway(env, "users", "list", "--status", "active", "--json"))
    assert [u["email"] for u in bob["items"]] == ["bob@example.com"]

    # A disabled user gets no key; the message says why, on one line.
    refused = await atollway(env, "keys", "create", ada_id)
    assert "disabled" in one_line_error(refused)


def test_errors_are_one_line_and_fail(tmp_path: Path) -> None:
    env = {"TOLLWAY_DATA_DIR": str(tmp_path / "data")}
    assert "no consumer" in one_line_error(tollway(env, "users", "disable", "nobody@example.com"))
    missing = str(uuid.uuid4())
    assert missing in one_line_error(tollway(env, "users", "disable", missing))
    assert "neither a user id" in one_line_error(tollway(env, "keys", "create", "ada"))
    assert "not a key id" in one_line_error(tollway(env, "keys", "disable", "xyz"))
    assert missing in one_line_error(tollway(env, "keys", "rotate", missing))
    assert "--grace" in one_line_error(
        tollway(env, "keys", "rotate", missing, "--grace", "soon"), 2)
    assert "--expires" in one_line_error(
        tollway(env, "keys", "create", "a@example.com", "--expires", "someday"), 2)
    assert "email" in one_line_error(tollway(env, "users", "create", "not-an-email"))
    past = (datetime.now(UTC) - timedelta(days=1)).isoformat()
    tollway(env, "users", "create", "a@example.com")
    assert "expires_at" in one_line_error(
        tollway(env, "keys", "create", "a@example.com", "--expires", past))
    assert "--from" in one_line_error(
        tollway(env, "usage", missing, "--from", "2025-02-01", "--to", "2025-01-01"), 2)
    assert "status" in one_line_error(tollway(env, "users", "list", "--status", "sleeping"))


def test_an_unreachable_database_is_one_clear_line(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    env = {
        "TOLLWAY_DATA_DIR": str(tmp_path / "data"),
        "TOLLWAY_DATABASE_URL": f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{port}/x",
    }
    message = one_line_error(tollway(env, "users", "list"))
    assert f"cannot use the database at postgresql+asyncpg://postgres:***@127.0.0.1:{port}/x" in (
        message
    )
    assert "s3cret" not in message
    assert "cannot use the database" in one_line_error(tollway(env, "migrate", "--check"))


def test_data_dir_flag(tmp_path: Path) -> None:
    result = tollway({}, "users", "create", "a@example.com", "--data-dir", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "tollway.db").exists()


def test_admin_token_is_generated_once_and_printed(tmp_path: Path) -> None:
    env = {"TOLLWAY_DATA_DIR": str(tmp_path / "data")}
    first = tollway(env, "admin-token")
    assert first.exit_code == 0, first.output
    token = first.stdout.strip()
    path = tmp_path / "data" / "admin_token"
    assert path.read_text().strip() == token
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert f"generated a new admin token into {path}" in first.stderr
    second = tollway(env, "admin-token")
    assert second.stdout.strip() == token
    assert f"stored in {path}" in second.stderr
    from_env = tollway({**env, "TOLLWAY_ADMIN_TOKEN": "set-by-operator"}, "admin-token")
    assert from_env.stdout.strip() == "set-by-operator"
    assert "TOLLWAY_ADMIN_TOKEN" in from_env.stderr


@pytest.mark.needs_redis
async def test_changes_are_announced_to_gateways_over_redis(tmp_path: Path) -> None:
    from redis.asyncio import Redis

    from tollway.identity.invalidation import CHANNEL

    redis = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        await redis.ping()
    except OSError:
        await redis.aclose()
        pytest.skip("Redis not reachable at 127.0.0.1:6379")
    env = {"TOLLWAY_DATA_DIR": str(tmp_path / "data"),
           "TOLLWAY_REDIS_URL": "redis://127.0.0.1:6379/0"}
    pubsub = redis.pubsub()
    try:
        await pubsub.subscribe(CHANNEL)
        user = as_json(await atollway(env, "users", "create", "r@example.com", "--json"))
        key = as_json(await atollway(env, "keys", "create", user["id"], "--json"))
        result = await atollway(env, "keys", "disable", key["id"])
        assert result.exit_code == 0, result.output
        assert "warning" not in result.output
        deadline = asyncio.get_running_loop().time() + 5
        heard: list[Any] = []
        while ["key", key["id"]] not in heard:
            assert asyncio.get_running_loop().time() < deadline, heard
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            if message is not None:
                heard.append(json.loads(message["data"]))
    finally:
        await pubsub.aclose()
        await redis.aclose()
