"""Alembic environment: async engines, SQLite batch mode, type comparison.

On MySQL/MariaDB (no partial indexes) the initial migration builds unique-among-live-rows
keys from generated columns; comparison leaves those stand-ins, and the partial indexes
they replace, out (see ``MYSQL_LIVE_KEYS`` in the initial migration). The full-text search
objects of migration 0003 (``db.search_sql``) exist only in the database on every backend:
the PostgreSQL ``tsvector`` column and its GIN index, SQLite's FTS5 table with its shadow
tables, the MariaDB FULLTEXT index; comparison leaves them out too.

The URL is ``DATABASE_URL`` when set, else the ini's ``sqlalchemy.url``. Programmatic
callers (``db.migrate``, tests) may pass an open synchronous connection through
``config.attributes["connection"]`` instead, and then no engine is created here.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig
from typing import Any

from alembic import context
from sqlalchemy import Column, Connection, Index, pool

import db.models
from db.engine_factory import async_engine
from db.models import Base
from db.models.predictions import COMMIT_SEQUENCE_TABLE
from db.search_sql import MYSQL_FULLTEXT_INDEX, PG_VECTOR_COLUMN, PG_VECTOR_INDEX, SQLITE_FTS_TABLE

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata
assert db.models.TENANT_TABLES  # importing db.models registers every table


def _url() -> str:
    url = os.environ.get("DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("set DATABASE_URL or sqlalchemy.url")
    return url


#: Indexes over live rows only (``postgresql_where``): MySQL/MariaDB cannot build them.
_PARTIAL_INDEXES = frozenset(
    index.name
    for table in target_metadata.tables.values()
    for index in table.indexes
    if isinstance(index.name, str) and index.dialect_options["postgresql"]["where"] is not None
)


def _is_database_only_object(name: str | None, type_: str) -> bool:
    """Search objects (migration 0003) and the commit-order counter (0005): built by
    migrations per backend, not modelled."""
    if name is None:
        return False
    if type_ == "table":
        return name in (SQLITE_FTS_TABLE, COMMIT_SEQUENCE_TABLE) or name.startswith(
            SQLITE_FTS_TABLE + "_"
        )
    if type_ == "index":
        return name in (PG_VECTOR_INDEX, MYSQL_FULLTEXT_INDEX)
    return type_ == "column" and name == PG_VECTOR_COLUMN


def _include(obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any) -> bool:
    return not (reflected and compare_to is None and _is_database_only_object(name, type_))


def _include_on_mysql(
    obj: Any, name: str | None, type_: str, reflected: bool, compare_to: Any
) -> bool:
    if not _include(obj, name, type_, reflected, compare_to):
        return False
    if type_ == "index" and isinstance(obj, Index) and name in _PARTIAL_INDEXES:
        return False
    # The generated columns standing in for partial unique indexes exist only in the database.
    return not (
        type_ == "column"
        and reflected
        and compare_to is None
        and isinstance(obj, Column)
        and obj.computed is not None
    )


def _configure(connection: Connection) -> None:
    mysql = connection.dialect.name in ("mysql", "mariadb")
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        compare_server_default=False,
        include_object=_include_on_mysql if mysql else _include,
        # SQLite cannot ALTER most things: batch mode copies the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
    )


def _run_migrations(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    engine = async_engine(_url(), poolclass=pool.NullPool)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_migrations)
            await connection.commit()
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(
        url=_url(),
        target_metadata=target_metadata,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
        render_as_batch=_url().startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_migrations(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
