"""Schema migrations driven from code: upgrade on start, and what health reports.

The Alembic scripts ship inside the ``migrations`` package, so this works from an
installed wheel without ``alembic.ini``.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, pool
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from db.engine_factory import async_engine

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent


def alembic_config(url: str | None = None) -> Config:
    """An Alembic config pointing at the packaged scripts (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["configure_logger"] = False
    return config


def head_revision() -> str:
    """The revision the code expects the schema to be at."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise RuntimeError("no migration scripts found")
    return head


def _upgrade(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)


def _current(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


async def upgrade_to_head(url: str) -> None:
    """Bring the database at ``url`` to the head revision (idempotent)."""
    engine = async_engine(url, poolclass=pool.NullPool)
    try:
        async with engine.begin() as connection:
            await connection.run_sync(_upgrade, "head")
    finally:
        await engine.dispose()


async def current_revision(url_or_engine: str | AsyncEngine) -> str | None:
    """The schema's current revision, or None for an empty (never migrated) database."""
    if isinstance(url_or_engine, AsyncEngine):
        async with url_or_engine.connect() as connection:
            return await connection.run_sync(_current)
    engine = async_engine(url_or_engine, poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            return await connection.run_sync(_current)
    finally:
        await engine.dispose()
