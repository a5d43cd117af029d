"""The `tollway` command as a user runs it."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import types
import urllib.request
from collections.abc import Callable
from pathlib import Path
from textwrap import dedent

import pytest
from typer.testing import CliRunner

from tollway import __version__
from tollway.cli import DEMO_CONFIG, app
from tollway.plugins.base import PLUGINS, load_builtin_plugins
from tollway.settings import Settings

runner = CliRunner()

GOOD = """
services:
  - name: images
    url: http://127.0.0.1:9000
routes:
  - name: images
    service: images
    paths: ["/images"]
"""

BAD = """
services:
  - name: images
    url: http://127.0.0.1:9000
routes:
  - name: images
    service: imagez
    paths: ["images"]
plugins:
  - name: no-such-plugin
"""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(Settings.model_fields):
        monkeypatch.delenv(f"TOLLWAY_{name.upper()}", raising=False)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "tollway.yaml"
    path.write_text(dedent(text))
    return path


def test_version() -> None:
    result = runner.invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output == f"tollway {__version__}\n"


def test_check_accepts_a_valid_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 0, result.output
    assert f"{path} is valid: 1 service, 1 route, 0 consumers, 0 plugins" in result.output


def test_check_lists_every_problem_and_fails(tmp_path: Path) -> None:
    path = write(tmp_path, BAD)
    result = runner.invoke(app, ["check", str(path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        'routes[0].paths[0]: must start with "/"',
        'routes[0].service: unknown service "imagez" (did you mean "images"?)',
        'plugins[0].name: unknown plugin "no-such-plugin"',
        f"{path}: 3 problems",
    ]


def test_check_json_for_ci(tmp_path: Path) -> None:
    bad = runner.invoke(app, ["check", "--json", str(write(tmp_path, BAD))])
    assert bad.exit_code == 1
    report = json.loads(bad.output)
    assert report["ok"] is False
    assert report["issues"][0] == {"path": "routes[0].paths[0]", "message": 'must start with "/"'}

    good = runner.invoke(app, ["check", "--json", str(write(tmp_path, GOOD))])
    assert good.exit_code == 0
    assert json.loads(good.output)["summary"] == {
        "services": 1,
        "routes": 1,
        "consumers": 0,
        "plugins": 0,
    }


def test_check_names_an_unreadable_file(tmp_path: Path) -> None:
    result = runner.invoke(app, ["check", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1
    assert result.output.splitlines()[0] == "cannot read: No such file or directory"


def _builtin_plugins() -> set[str]:
    with contextlib.suppress(ModuleNotFoundError):
        load_builtin_plugins()
    return set(PLUGINS)


@pytest.mark.skipif(
    not {"request-id", "security-headers", "cors", "response-compression", "access-log"}
    <= _builtin_plugins(),
    reason="the demo config's plugins are not all built in yet",
)
def test_the_demo_config_passes_check() -> None:
    result = runner.invoke(app, ["check", str(DEMO_CONFIG)])
    assert result.exit_code == 0, result.output


@pytest.fixture
def fake_gateway(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    """Stands in for tollway.gateway.app: records the settings, exits with 3."""
    seen: list[Settings] = []

    def serve(settings: Settings) -> int:
        seen.append(settings)
        return 3

    module = types.ModuleType("tollway.gateway.app")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tollway.gateway.app", module)
    return seen


def test_serve_flags_win_over_environment(fake_gateway: list[Settings], tmp_path: Path) -> None:
    env = {"TOLLWAY_PORT": "9100", "TOLLWAY_ADMIN_PORT": "9101", "TOLLWAY_WORKERS": "2"}
    result = runner.invoke(
        app, ["serve", "-c", str(tmp_path / "t.yaml"), "--admin-port", "9201"], env=env
    )

    assert result.exit_code == 3
    [settings] = fake_gateway
    assert settings.config == tmp_path / "t.yaml"
    assert (settings.port, settings.admin_port, settings.workers) == (9100, 9201, 2)
    assert settings.host == "0.0.0.0"


def test_serve_rejects_a_bad_setting_naming_flag_and_variable(
    fake_gateway: list[Settings],
) -> None:
    result = runner.invoke(app, ["serve", "--port", "70000"])
    assert result.exit_code == 2
    assert result.output.splitlines() == [
        "--port / TOLLWAY_PORT: Input should be less than or equal to 65535"
    ]
    assert fake_gateway == []


def test_quickstart_serves_the_demo_config_in_front_of_a_live_upstream(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Restored after the test: quickstart sets it for the config interpolation.
    monkeypatch.setenv("TOLLWAY_DEMO_UPSTREAM", "unset")
    answers: list[dict[str, object]] = []

    def serve(settings: Settings, on_ready: Callable[[], None] | None = None) -> int:
        assert settings.config == DEMO_CONFIG
        assert (settings.host, settings.port) == ("127.0.0.1", 8100)
        upstream = os.environ["TOLLWAY_DEMO_UPSTREAM"]
        with urllib.request.urlopen(f"{upstream}/hello", timeout=5) as response:
            answers.append(json.load(response))
        assert on_ready is not None
        on_ready()
        return 0

    module = types.ModuleType("tollway.gateway.app")
    module.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tollway.gateway.app", module)

    result = runner.invoke(app, ["quickstart", "--upstream-port", "0", "--port", "8100"])

    assert result.exit_code == 0, result.output
    assert answers[0]["message"] == "hello from the demo upstream"
    assert "curl -i http://127.0.0.1:8100/demo/hello" in result.output


def test_quickstart_serves_the_demo_for_real(tmp_path: Path) -> None:
    """What `make run` starts: a demo upstream and a gateway, with a curl line that works."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.error
    import urllib.request

    from support.gateway import free_ports

    port, admin_port, upstream_port = free_ports(3)
    log = (tmp_path / "quickstart.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tollway", "quickstart", "--port", str(port),
         "--admin-port", str(admin_port), "--upstream-port", str(upstream_port),
         "--data-dir", str(tmp_path / "data")],
        stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "TOLLWAY_LOG_LEVEL": "warning"},
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/demo/hello") as r:
                    body = r.read()
                    status = r.status
                    request_id = r.headers["x-request-id"]
                break
            except OSError:
                assert proc.poll() is None, (tmp_path / "quickstart.log").read_text()
                assert time.monotonic() < deadline, "quickstart did not serve in 20 s"
                time.sleep(0.1)  # polling for the listener; nothing to wait on
        assert status == 200
        assert b"hello from the demo upstream" in body
        assert request_id
        printed = (tmp_path / "quickstart.log").read_text()
        assert f"curl -i http://127.0.0.1:{port}/demo/hello" in printed
        # The keyed route: the printed curl line works, and without its key it is a 401.
        keyed = next(line for line in printed.splitlines() if "X-API-Key: tw_live_" in line)
        key = keyed.split("X-API-Key: ", 1)[1].split("'", 1)[0]
        url = f"http://127.0.0.1:{port}/keyed/hello"
        with urllib.request.urlopen(urllib.request.Request(url, headers={"X-API-Key": key})) as r:
            assert r.status == 200
            # The demo key is rate limited: 30 a minute, 1,000 a day.
            assert r.headers["X-RateLimit-Limit"] == "30"
            assert r.headers["X-RateLimit-Remaining"] == "29"
        try:
            urllib.request.urlopen(url)
            raise AssertionError("the keyed route answered without a key")
        except urllib.error.HTTPError as err:
            assert err.code == 401
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(15)
        log.close()


def test_check_names_a_plugin_file_it_cannot_open(tmp_path: Path) -> None:
    (tmp_path / "logdir").mkdir()
    cfg = tmp_path / "tollway.yaml"
    cfg.write_text(f"plugins:\n  - name: access-log\n    config: {{path: {tmp_path / 'logdir'}}}\n")
    result = runner.invoke(app, ["check", str(cfg)])
    assert result.exit_code == 1
    assert "plugins[0].config" in result.output
