"""The `tollway` commands that work on the database directly: migrate, users, keys,
plans, usage, admin-token.

They read the same TOLLWAY_* settings as the server (TOLLWAY_DATABASE_URL, else the
SQLite file in TOLLWAY_DATA_DIR; TOLLWAY_KEY_PEPPER, else data_dir/key_pepper), so
they work before any server runs, and bring the schema up to date first as the
server does. Changes are announced to running gateways over Redis when
TOLLWAY_REDIS_URL is set; gateways also pick them up from the database's
invalidation outbox within a second.

One module per command group; support.py holds what they share.
"""

from __future__ import annotations

import typer

from tollway.cli_db.keys import keys_app
from tollway.cli_db.maintenance import admin_token, migrate
from tollway.cli_db.plans import plans_app
from tollway.cli_db.usage import usage
from tollway.cli_db.users import users_app


def register(app: typer.Typer) -> None:
    """Add these commands to the `tollway` command."""
    app.command("migrate")(migrate)
    app.add_typer(users_app)
    app.add_typer(keys_app)
    app.add_typer(plans_app)
    app.command("usage")(usage)
    app.command("admin-token")(admin_token)
