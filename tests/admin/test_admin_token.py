"""The admin token: configured, or generated once, stored 0600, printed once."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import httpx
import pytest
from admin_helpers import assert_envelope

from support.gateway import api_config, running_gateway
from tollway.admin.token import AdminTokenError, load_admin_token, token_matches, token_path
from tollway.settings import Settings


@pytest.fixture(autouse=True)
def no_token_in_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TOLLWAY_ADMIN_TOKEN", raising=False)


def test_generated_once_then_read_back(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    first = load_admin_token(settings)
    assert first.generated and first.path == tmp_path / "data" / "admin_token"
    assert len(first.value) >= 40
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o600
    second = load_admin_token(settings)
    assert (second.value, second.generated) == (first.value, False)
    # Nothing but the token file is left in the directory (no temporary files).
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["admin_token"]


def test_the_environment_wins_and_writes_nothing(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", admin_token="from-env")
    token = load_admin_token(settings)
    assert (token.value, token.path, token.generated) == ("from-env", None, False)
    assert not token_path(settings).exists()
    with pytest.raises(AdminTokenError, match="empty"):
        load_admin_token(Settings(data_dir=tmp_path, admin_token="  "))


def test_an_empty_token_file_is_refused_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "admin_token").write_text("\n")
    with pytest.raises(AdminTokenError, match="is empty"):
        load_admin_token(Settings(data_dir=tmp_path))
    assert (tmp_path / "admin_token").read_text() == "\n"


def test_concurrent_first_starts_agree_on_one_token(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    results = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_admin_token(settings))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({r.value for r in results}) == 1
    assert sum(r.generated for r in results) == 1
    assert (tmp_path / "data" / "admin_token").read_text().strip() == results[0].value


def test_token_comparison() -> None:
    assert token_matches("abc", "abc")
    assert not token_matches("abc", "abd")
    assert not token_matches("abc", "abcd")
    assert not token_matches("abc", "")


async def test_the_gateway_prints_a_generated_token_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = api_config("http://127.0.0.1:9")
    async with running_gateway(tmp_path, config) as gw:
        first = capsys.readouterr()
        path = tmp_path / "data" / "admin_token"
        token = path.read_text().strip()
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert token in first.err and str(path) in first.err
        assert token not in first.out
        base = f"http://127.0.0.1:{gw.admin_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.get("/users", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200
            r = await client.get("/users")
            assert r.status_code == 401
            assert_envelope(r.json(), "unauthorized")

    async with running_gateway(tmp_path, config) as gw:
        second = capsys.readouterr()
        assert token not in second.err and token not in second.out
        assert path.read_text().strip() == token
        base = f"http://127.0.0.1:{gw.admin_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            r = await client.get("/status", headers={"authorization": f"Bearer {token}"})
            assert r.status_code == 200


async def test_a_configured_token_is_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = api_config("http://127.0.0.1:9")
    async with running_gateway(tmp_path, config, admin_token="configured-secret") as gw:
        captured = capsys.readouterr()
        assert "configured-secret" not in captured.err + captured.out
        assert not (tmp_path / "data" / "admin_token").exists()
        base = f"http://127.0.0.1:{gw.admin_port}"
        async with httpx.AsyncClient(base_url=base) as client:
            ok = await client.get("/status", headers={"authorization": "Bearer configured-secret"})
            assert ok.status_code == 200
