"""The pool survives a MariaDB restart: pre-ping replaces connections the restart killed.

On a private MariaDB instance (tests/db/mariadb_instance.py), restarted by its pid.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import text

from db.engine import Database, DatabaseConfig
from db.errors import DatabaseUnavailableError
from db.migrate import upgrade_to_head
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from tests.db.mariadb_instance import MariaDBInstance, mariadb_instance
from tests.template_databases import mariadb_connect


@pytest.fixture
def instance() -> Iterator[MariaDBInstance]:
    with mariadb_instance() as running:
        yield running


@pytest.fixture
async def database_url(instance: MariaDBInstance) -> str:
    conn = await mariadb_connect(instance.url + "/mysql")
    try:
        async with conn.cursor() as cursor:
            await cursor.execute(
                "CREATE DATABASE ferrule CHARACTER SET utf8mb4 COLLATE utf8mb4_nopad_bin"
            )
    finally:
        conn.close()
    url = instance.url + "/ferrule"
    await upgrade_to_head(url)
    return url


async def _organizations(database: Database) -> int:
    async with database.transaction(Tenant.all(), read_only=True) as session:
        return int((await session.execute(text("SELECT count(*) FROM organizations"))).scalar_one())


@pytest.mark.parametrize("pre_ping", [True, False])
async def test_pooled_connections_after_a_restart(
    instance: MariaDBInstance, database_url: str, pre_ping: bool
) -> None:
    database = Database(
        DatabaseConfig(
            url=database_url, pool_size=2, pool_pre_ping=pre_ping, pool_ping_idle_seconds=0
        )
    )
    try:
        async with database.transaction(Tenant.all()) as session:
            await OrganizationsRepository(session, Tenant.all()).create("before")
        instance.stop()
        instance.start()  # same data, same port: every pooled connection is now dead
        if pre_ping:
            assert await _organizations(database) == 1
        else:  # what pre-ping spares the first caller after a restart
            with pytest.raises(DatabaseUnavailableError):
                await _organizations(database)
            assert await _organizations(database) == 1  # the dead connection was dropped
    finally:
        await database.dispose()
