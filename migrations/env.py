"""Alembic environment: the URL comes from Darkroom's settings (or the caller's config)."""

from __future__ import annotations

from alembic import context

from darkroom.settings import get_settings
from db.models import Base
from db.session import make_engine

config = context.config


def _database_url() -> str:
    """The URL set by the caller (db.migrate), else the one from the settings."""
    return config.get_main_option("sqlalchemy.url") or get_settings().resolved_database_url


def run_migrations_online() -> None:
    """Apply migrations over a live connection; batch mode lets ALTERs work on SQLite."""
    engine = make_engine(_database_url())
    with engine.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=True,
            compare_type=True,
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


run_migrations_online()
