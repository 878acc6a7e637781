"""Migrations: a fresh SQLite file and the session's Postgres reach head, idempotently."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from db.migrate import alembic_config, upgrade_to_head
from db.models import Base

TABLES = {"api_keys", "jobs", "job_outputs", "webhook_deliveries", "webhook_attempts"}


def _head(url: str) -> str:
    head = ScriptDirectory.from_config(alembic_config(url)).get_current_head()
    assert head is not None
    return head


def _columns(url: str) -> dict[str, set[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            inspector = inspect(conn)
            return {t: {c["name"] for c in inspector.get_columns(t)} for t in TABLES}
    finally:
        engine.dispose()


def _state(url: str) -> tuple[set[str], list[str]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            tables = set(inspect(conn).get_table_names())
            versions = [
                str(v) for v in conn.scalars(text("SELECT version_num FROM alembic_version"))
            ]
    finally:
        engine.dispose()
    return tables, versions


def test_revisions_form_one_linear_chain() -> None:
    script = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert len(script.get_heads()) == 1
    chain = [rev.revision for rev in script.walk_revisions()]  # head first
    assert chain == sorted(chain, reverse=True)
    assert chain[-1] == "0001"


def test_fresh_sqlite_file_upgrades_twice(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "darkroom.sqlite3"
    url = f"sqlite:///{path}"
    upgrade_to_head(url)
    assert path.exists()
    tables, versions = _state(url)
    assert tables >= TABLES
    assert versions == [_head(url)]

    upgrade_to_head(url)  # a no-op
    again_tables, again_versions = _state(url)
    assert again_tables == tables
    assert again_versions == versions


def test_postgres_is_at_head_and_upgrade_is_a_noop(pg_url: str) -> None:
    tables, versions = _state(pg_url)
    assert tables >= TABLES | {"alembic_version"}
    assert versions == [_head(pg_url)]

    upgrade_to_head(pg_url)
    assert _state(pg_url) == (tables, versions)


def test_migrated_columns_match_the_models(tmp_path: Path, pg_url: str) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'cols.sqlite3'}"
    upgrade_to_head(sqlite_url)
    expected = {t: set(Base.metadata.tables[t].columns.keys()) for t in TABLES}
    assert _columns(sqlite_url) == expected
    assert _columns(pg_url) == expected
