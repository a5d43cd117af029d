"""One pepper per database: a process with another one is refused at start."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from support.gateway import running_gateway
from tollway.identity.pepper import PepperMismatch, verify_pepper
from tollway.storage.database import Database, default_url


async def test_same_pepper_is_accepted_twice(database: Database) -> None:
    await verify_pepper(database, b"pepper-one")
    await verify_pepper(database, b"pepper-one")


async def test_another_pepper_is_refused_with_what_to_set(database: Database) -> None:
    await verify_pepper(database, b"pepper-one")
    with pytest.raises(PepperMismatch, match="TOLLWAY_KEY_PEPPER"):
        await verify_pepper(database, b"pepper-two")


async def test_gateway_with_another_pepper_does_not_start(tmp_path: Path) -> None:
    url = default_url(tmp_path / "shared")
    config = '_format_version: "1"\n'
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
    async with running_gateway(tmp_path / "a", config, database_url=url, key_pepper="one"):
        pass
    with pytest.raises(PepperMismatch):
        async with running_gateway(tmp_path / "b", config, database_url=url, key_pepper="two"):
            pass


def test_sqlite_file_is_private(tmp_path: Path) -> None:
    Database(default_url(tmp_path))
    assert os.stat(tmp_path / "tollway.db").st_mode & 0o777 == 0o600


def test_an_empty_pepper_file_is_refused(tmp_path: Path) -> None:
    from tollway.identity.apikeys import PEPPER_FILE, PepperError, load_pepper

    (tmp_path / PEPPER_FILE).write_bytes(b"\n")
    with pytest.raises(PepperError, match="TOLLWAY_KEY_PEPPER"):
        load_pepper(None, tmp_path)
