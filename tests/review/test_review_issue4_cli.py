"""Review of issue 4: CLI durations and times too large for a datetime were a
traceback instead of a one-line error with exit code 2."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tollway.cli import app
from tollway.settings import Settings

runner = CliRunner()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"TOLLWAY_{name.upper()}", raising=False)


def test_huge_durations_are_a_usage_error_not_a_traceback(tmp_path: Path) -> None:
    env = {"TOLLWAY_DATA_DIR": str(tmp_path / "data")}
    some_id = str(uuid.uuid4())
    cases = [
        (["keys", "rotate", some_id, "--grace", "99999999999999d"], "--grace"),
        (["keys", "create", "a@example.com", "--expires", "99999999999d"], "--expires"),
        (["usage", some_id, "--from", "99999999999d"], "--from"),
        (["usage", some_id, "--to", "0001-01-01T00:00:00Z"], "--to"),
    ]
    for args, flag in cases:
        result = runner.invoke(app, args, env=env)
        assert result.exit_code == 2, (args, result.exit_code, result.output)
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), (
            args, repr(result.exception))
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert flag in lines[0], lines[0]
