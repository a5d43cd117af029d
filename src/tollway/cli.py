"""The `tollway` command: serve, check, quickstart, demo-upstream, version; and the
database commands of cli_db (migrate, users, keys, usage, admin-token)."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
from pathlib import Path
from typing import Annotated, Any, NoReturn, cast

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.panel import Panel
from rich.text import Text

from tollway import __version__
from tollway.cli_db import register as register_db_commands
from tollway.config.errors import ConfigError, ConfigIssue
from tollway.config.loader import issues_from_validation, load_config
from tollway.config.schema import GatewayConfig
from tollway.settings import Settings

app = typer.Typer(
    name="tollway",
    help="Tollway: an API gateway for platforms that sell access to paid services.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console()

DEMO_CONFIG = Path(__file__).parent / "demo" / "tollway.demo.yaml"
DEMO_UPSTREAM_PORT = 9000


def _fail(message: str, code: int = 1) -> NoReturn:
    console.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    raise typer.Exit(code)


def _print_issues(issues: list[ConfigIssue]) -> None:
    # Text, not markup: paths such as `routes[2]` would otherwise read as Rich tags.
    for issue in issues:
        console.print(Text(str(issue), style="red"), soft_wrap=True, highlight=False)


def _settings(**given: Any) -> Settings:
    """Settings from TOLLWAY_* variables, with every flag actually given winning."""
    try:
        return Settings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        # Name both places the value may have come from: the flag and the variable.
        _print_issues(
            [
                ConfigIssue(f"--{i.path.replace('_', '-')} / TOLLWAY_{i.path.upper()}", i.message)
                for i in issues_from_validation(exc, Settings)
            ]
        )
        raise typer.Exit(2) from None


# ---------------------------------------------------------------- serve

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="tollway.yaml to serve (env TOLLWAY_CONFIG)"),
]
HostOpt = Annotated[
    str | None, typer.Option(help="proxy listen address (env TOLLWAY_HOST, default 0.0.0.0)")
]
PortOpt = Annotated[
    int | None, typer.Option(help="proxy listen port (env TOLLWAY_PORT, default 8000)")
]
AdminHostOpt = Annotated[
    str | None,
    typer.Option(help="admin API address (env TOLLWAY_ADMIN_HOST, default 127.0.0.1)"),
]
AdminPortOpt = Annotated[
    int | None, typer.Option(help="admin API port (env TOLLWAY_ADMIN_PORT, default 8001)")
]
DataDirOpt = Annotated[
    Path | None, typer.Option(help="state directory (env TOLLWAY_DATA_DIR, default ./data)")
]
WorkersOpt = Annotated[
    int | None, typer.Option(help="data-plane processes (env TOLLWAY_WORKERS, default 1)")
]
PerWorkerLimitsOpt = Annotated[
    bool | None,
    typer.Option(
        "--per-worker-limits",
        help="with --workers N and no Redis, let each worker count rate limits alone "
        "(N times the limit in total; env TOLLWAY_PER_WORKER_LIMITS)",
    ),
]


@app.command()
def serve(
    config: ConfigOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    admin_host: AdminHostOpt = None,
    admin_port: AdminPortOpt = None,
    data_dir: DataDirOpt = None,
    workers: WorkersOpt = None,
    per_worker_limits: PerWorkerLimitsOpt = None,
) -> None:
    """Run the gateway: the proxy and the admin API, until SIGINT or SIGTERM."""
    settings = _settings(
        config=config,
        host=host,
        port=port,
        admin_host=admin_host,
        admin_port=admin_port,
        data_dir=data_dir,
        workers=workers,
        per_worker_limits=per_worker_limits,
    )
    from tollway.gateway.app import serve as run

    raise typer.Exit(run(settings))


# ---------------------------------------------------------------- check


def _summary(config: GatewayConfig) -> dict[str, int]:
    return {
        "services": len(config.services),
        "routes": len(config.routes),
        "consumers": len(config.consumers),
        "plugins": len(config.plugins),
    }


def _validate(path: Path) -> GatewayConfig:
    """Everything `serve` would refuse: the file, then compiling it into a snapshot."""
    from tollway.config.snapshot import build_snapshot

    config = load_config(path)
    # Plugin instances may hold resources; a check keeps none of them.
    build_snapshot(config, source=str(path)).close()
    return config


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="the tollway.yaml to check")],
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Validate a config file; exit 1 and list every problem if it is invalid."""
    try:
        config = _validate(path)
    except ConfigError as exc:
        if as_json:
            issues = [{"path": i.path, "message": i.message} for i in exc.issues]
            typer.echo(json.dumps({"ok": False, "source": str(path), "issues": issues}))
        else:
            _print_issues(exc.issues)
            console.print(
                Text(f"{path}: {_plural(len(exc.issues), 'problem')}", style="bold red"),
                soft_wrap=True,
            )
        raise typer.Exit(1) from None
    counts = _summary(config)
    if as_json:
        typer.echo(json.dumps({"ok": True, "source": str(path), "summary": counts}))
        return
    parts = ", ".join(_plural(n, kind.removesuffix("s")) for kind, n in counts.items())
    console.print(Text.assemble(("✓ ", "bold green"), f"{path} is valid: {parts}"), soft_wrap=True)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


# ---------------------------------------------------------------- demo


@app.command("demo-upstream")
def demo_upstream(
    host: Annotated[str, typer.Option(help="listen address")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="listen port")] = DEMO_UPSTREAM_PORT,
) -> None:
    """Run the demo upstream (hello, echo, bytes, delay, status, stream) in the foreground."""
    from tollway.demo.upstream import run_demo_upstream

    console.print(f"demo upstream on http://{host}:{port} (try /hello, /echo, /stream/5)")
    run_demo_upstream(host, port)


def _free_demo_port(host: str) -> int:
    """9000 when it is free, so that the printed URLs are the usual ones; else any."""
    with socket.socket() as probe:
        try:
            probe.bind((host, DEMO_UPSTREAM_PORT))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
        else:
            return DEMO_UPSTREAM_PORT
    return 0


def _start_demo_thread(host: str, port: int) -> int:
    """Run the demo upstream on its own loop in a daemon thread; returns its port.

    A thread rather than a task on the gateway's loop keeps the quickstart working
    whatever loop policy and worker model `serve` chooses.
    """
    from tollway.demo.upstream import bound_port, start_demo_upstream

    ready = threading.Event()
    result: dict[str, int | BaseException] = {}

    async def main() -> None:
        try:
            server = await start_demo_upstream(host, port)
        except OSError as exc:
            result["error"] = exc
            ready.set()
            return
        result["port"] = bound_port(server)
        ready.set()
        async with server:
            await server.serve_forever()

    threading.Thread(target=asyncio.run, args=(main(),), name="demo-upstream", daemon=True).start()
    ready.wait()
    error = result.get("error")
    if isinstance(error, BaseException):
        _fail(f"cannot start the demo upstream on {host}:{port}: {error}")
    return cast(int, result["port"])


@app.command()
def quickstart(
    port: Annotated[int, typer.Option(help="proxy port")] = 8000,
    admin_port: Annotated[int, typer.Option(help="admin API port")] = 8001,
    data_dir: DataDirOpt = None,
    upstream_port: Annotated[
        int | None,
        typer.Option(help="demo upstream port (default 9000, or any free port if 9000 is taken)"),
    ] = None,
) -> None:
    """Start a demo upstream and a gateway in front of it, on this machine only."""
    host = "127.0.0.1"
    if upstream_port is None:
        upstream_port = _free_demo_port(host)
    upstream_port = _start_demo_thread(host, upstream_port)
    # The demo config reads this through ${TOLLWAY_DEMO_UPSTREAM:-...}.
    os.environ["TOLLWAY_DEMO_UPSTREAM"] = f"http://{host}:{upstream_port}"
    settings = _settings(
        config=DEMO_CONFIG,
        host=host,
        port=port,
        admin_host=host,
        admin_port=admin_port,
        data_dir=data_dir,
        workers=1,
    )
    from sqlalchemy.exc import SQLAlchemyError

    from tollway.demo.provision import demo_key
    from tollway.gateway.app import serve as run
    from tollway.identity.apikeys import PepperError
    from tollway.identity.errors import IdentityError

    try:
        key: str | None = asyncio.run(demo_key(settings))
    except (OSError, SQLAlchemyError, IdentityError, PepperError) as exc:
        # The demo key is a convenience: say why there is none, and serve anyway.
        console.print(f"[yellow]no demo API key: {exc}[/yellow]")
        key = None
    panel = _quickstart_panel(settings, upstream_port, key)

    def ready() -> None:
        # Printed once the listeners are up, so the curl lines work when they show.
        console.print(panel)
        if key is not None:
            # Outside the box and unwrapped, so that it can be copied as one line.
            print(
                f"curl -i -H 'X-API-Key: {key}' http://{settings.host}:{settings.port}/keyed/hello",
                flush=True,
            )

    raise typer.Exit(run(settings, on_ready=ready))


def _quickstart_panel(settings: Settings, upstream_port: int, key: str | None) -> Panel:
    proxy = f"http://{settings.host}:{settings.port}"
    body = Text.assemble(
        ("proxy     ", "bold"),
        proxy,
        "\n",
        ("admin     ", "bold"),
        f"http://{settings.admin_host}:{settings.admin_port}",
        "\n",
        ("upstream  ", "bold"),
        f"http://127.0.0.1:{upstream_port} (demo)",
        "\n",
        ("config    ", "bold"),
        str(settings.config),
        "\n\n",
        ("try: ", "bold green"),
        f"curl -i {proxy}/demo/hello",
        "\n",
        *(
            (
                ("with a key: ", "bold green"),
                "the curl line below this box (/keyed needs an API key)",
                "\n",
            )
            if key
            else ()
        ),
        ("stop: ", "dim"),
        ("Ctrl-C", "dim"),
    )
    return Panel(body, title="Tollway quickstart", expand=False)


# ---------------------------------------------------------------- version


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(f"tollway {__version__}")


# After the commands above, so that `tollway --help` lists serve and check first.
register_db_commands(app)


def main() -> None:
    app()
