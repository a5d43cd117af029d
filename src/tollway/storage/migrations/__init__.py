"""Alembic migrations for the models in storage/models.py.

Run through tollway.storage.migrate (which hands env.py a connection and sets the
script location in code), so no alembic.ini is needed at runtime. To write a new
revision during development:

    .venv/bin/python -m tollway.storage.migrate revision -m "what changes"

which autogenerates against a scratch SQLite database migrated to head.
"""

from __future__ import annotations

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
