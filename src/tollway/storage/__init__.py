"""Database engine, models, migrations and repositories."""
