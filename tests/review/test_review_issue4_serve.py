"""Review of issue 4: `tollway serve` with a database it cannot use printed a
screen-long traceback; the CLI commands say it on one line, and so must serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.gateway import GatewayProcess, api_config, free_port


@pytest.mark.parametrize("workers", [1, 2])
def test_serve_with_an_unusable_database_is_one_clear_line(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "tollway.yaml"
    config.write_text(api_config("http://127.0.0.1:9"))
    port = free_port()  # nothing listens there
    url = f"postgresql+asyncpg://postgres:s3cret@127.0.0.1:{port}/x"
    proc = GatewayProcess(config, env={"TOLLWAY_DATABASE_URL": url}, workers=workers)
    proc.spawn()
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    out = proc.stderr()
    assert code == 1, out
    assert "Traceback" not in out and "╭" not in out, out
    shown = f"postgresql+asyncpg://postgres:***@127.0.0.1:{port}/x"
    assert f"error: cannot use the database at {shown}" in out, out
    assert "s3cret" not in out


@pytest.mark.needs_postgres
async def test_serve_with_a_missing_postgres_database_is_one_clear_line(tmp_path: Path) -> None:
    from support.db import require_pg

    await require_pg()
    config = tmp_path / "tollway.yaml"
    config.write_text(api_config("http://127.0.0.1:9"))
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/no_such_database_review4"
    proc = GatewayProcess(config, env={"TOLLWAY_DATABASE_URL": url})
    proc.spawn()
    try:
        code = proc.wait(30)
    finally:
        proc.kill()
    out = proc.stderr()
    assert code == 1, out
    assert "Traceback" not in out and "╭" not in out, out
    assert "error: cannot use the database at " + url in out, out
    assert "no_such_database_review4" in out and "does not exist" in out, out
