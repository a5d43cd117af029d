"""`tollway migrate` and `tollway admin-token`: what an operator runs to set a gateway
up before (or without) starting it."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from tollway.cli_db import support
from tollway.cli_db.support import DataDirOpt

# ---------------------------------------------------------------- migrate


def migrate(
    check: Annotated[
        bool, typer.Option("--check", help="only check; exit 1 when the database is behind")
    ] = False,
    data_dir: DataDirOpt = None,
) -> None:
    """Bring the database schema up to date (the server also does this at start)."""
    from tollway.runtime import database_for
    from tollway.storage import migrate as migrations
    from tollway.storage.database import default_url

    settings = support.load_settings(data_dir)

    async def work() -> tuple[bool, str | None, str]:
        database = database_for(settings)
        try:
            if not check:
                await migrations.upgrade(database)
            current = await migrations.current_revision(database)
            is_current = await migrations.is_current(database)
            return is_current, current, migrations.head_revision()
        finally:
            await database.dispose()

    is_current, current, head = support.run(settings, work)
    url = support.safe_url(settings.database_url or default_url(settings.data_dir))
    if is_current:
        typer.echo(f"{url}: up to date (revision {head})")
        return
    where = f"at revision {current}" if current else "not initialized"
    support.fail(f"{url} is behind: {where}, head is {head}; run `tollway migrate`")


# ---------------------------------------------------------------- admin-token


def admin_token(data_dir: DataDirOpt = None) -> None:
    """Print the admin API's token (and, on stderr, where it comes from)."""
    from tollway.admin.token import AdminTokenError, load_admin_token

    settings = support.load_settings(data_dir)
    try:
        token = load_admin_token(settings)
    except (AdminTokenError, OSError) as exc:
        support.fail(str(exc))
    if token.path is None:
        support.stderr_console().print("admin token from TOLLWAY_ADMIN_TOKEN", soft_wrap=True)
    elif token.generated:
        support.stderr_console().print(
            f"generated a new admin token into {token.path} (mode 0600)", soft_wrap=True
        )
    else:
        support.stderr_console().print(f"admin token stored in {token.path}", soft_wrap=True)
    typer.echo(token.value)
    sys.stdout.flush()
