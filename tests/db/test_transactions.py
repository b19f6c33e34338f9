"""The transaction helper: commit/rollback, tenant settings, timeouts, cancellation, errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from db.engine import Database, DatabaseConfig
from db.errors import (
    AlreadyExistsError,
    DatabaseUnavailableError,
    StatementTimeoutError,
    ValidationError,
)
from db.models import Organization, User
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from tests.polling import eventually


async def test_commits_on_success_and_rolls_back_on_error(database: Database) -> None:
    async with database.transaction(Tenant.all()) as session:
        kept = await OrganizationsRepository(session, Tenant.all()).create("kept")

    class Boom(Exception):
        pass

    created: list[Organization] = []

    async def create_then_fail() -> None:
        async with database.transaction(Tenant.all()) as session:
            created.append(await OrganizationsRepository(session, Tenant.all()).create("dropped"))
            raise Boom

    with pytest.raises(Boom):
        await create_then_fail()
    dropped = created[0]
    async with database.transaction(Tenant.all()) as session:
        repo = OrganizationsRepository(session, Tenant.all())
        assert (await repo.get(kept.id)).display_name == "kept"
        with pytest.raises(Exception, match="not found"):
            await repo.get(dropped.id)


async def test_a_read_only_transaction_leaves_its_pooled_connection_writable(
    database_url: str,
) -> None:
    """Read-only mode belongs to one transaction: code that writes on the pool's connection
    without the transaction helper (a migration, a maintenance task) must not inherit it."""
    db = Database(DatabaseConfig(url=database_url, pool_size=1, max_overflow=0))
    try:
        async with db.transaction(Tenant.all(), read_only=True) as session:
            await session.execute(text("SELECT count(*) FROM organizations"))
        if db.dialect_name != "sqlite":  # the embedded database has no read-only mode
            with pytest.raises(Exception, match=r"(?i)read.only transaction"):
                async with db.transaction(Tenant.all(), read_only=True) as session:
                    await OrganizationsRepository(session, Tenant.all()).create("refused")
        async with AsyncSession(db.engine, expire_on_commit=False) as session, session.begin():
            created = await OrganizationsRepository(session, Tenant.all()).create("writable")
        async with db.transaction(Tenant.all(), read_only=True) as session:
            found = await OrganizationsRepository(session, Tenant.all()).get(created.id)
        assert found.display_name == "writable"
    finally:
        await db.dispose()


async def test_unique_violation_maps_to_already_exists(database: Database) -> None:
    async with database.transaction(Tenant.all()) as session:
        org = await OrganizationsRepository(session, Tenant.all()).create("org")
    with pytest.raises(AlreadyExistsError) as caught:
        async with database.transaction(Tenant.all()) as session:
            session.add(Organization(id=org.id, display_name="again"))
    assert caught.value.resource_type == "ferrule.v1.Organization"


async def test_check_and_not_null_violations_map_to_validation(
    database: Database, org_a: Organization
) -> None:
    tenant = Tenant.of(org_a.id)
    with pytest.raises(ValidationError) as caught:
        async with database.transaction(tenant) as session:
            session.add(
                User(organization_id=org_a.id, email="a@x.io", username="a", password_hash=None)
            )
    assert caught.value.violations[0].field == "password"
    with pytest.raises(ValidationError) as caught:
        async with database.transaction(tenant) as session:
            await session.execute(
                text("UPDATE organizations SET display_name = NULL WHERE id = :id"),
                {"id": org_a.id.hex if database.dialect_name == "sqlite" else org_a.id},
            )
    assert caught.value.violations[0].field == "display_name"


async def test_ping_and_pool_status(database: Database) -> None:
    result = await database.ping()
    assert result.latency_seconds >= 0
    assert result.server_version
    status = database.pool_status()
    assert status.checked_out == 0
    assert status.size >= 0


async def test_unreachable_database_is_unavailable() -> None:
    db = Database(DatabaseConfig(url="postgresql+asyncpg://postgres@127.0.0.1:1/none"))
    try:
        with pytest.raises(DatabaseUnavailableError):
            async with db.transaction(Tenant.all()) as session:
                await session.execute(text("SELECT 1"))
    finally:
        await db.dispose()


@pytest.fixture
async def pg_database(pg_database_url: str) -> AsyncIterator[Database]:
    db = Database(DatabaseConfig(url=pg_database_url, pool_size=2))
    yield db
    await db.dispose()


async def test_transaction_settings_are_local_and_one_round_trip(pg_database: Database) -> None:
    tenant = Tenant.of(uuid.uuid4())
    async with pg_database.transaction(tenant, timeout_ms=1234, read_only=True) as session:
        row = (
            await session.execute(
                text(
                    "SELECT current_setting('ferrule.organization_id'),"
                    " current_setting('ferrule.all_organizations'),"
                    " current_setting('statement_timeout'),"
                    " current_setting('client_connection_check_interval'),"
                    " current_setting('transaction_read_only')"
                )
            )
        ).one()
    assert tuple(row) == (str(tenant.organization_id), "off", "1234ms", "1s", "on")
    async with pg_database.transaction(Tenant.all()) as session:
        row = (
            await session.execute(
                text(
                    "SELECT current_setting('ferrule.organization_id', true),"
                    " current_setting('ferrule.all_organizations', true),"
                    " current_setting('statement_timeout')"
                )
            )
        ).one()
    assert tuple(row) == ("", "on", "0")


async def test_statement_timeout_maps_to_statement_timeout_error(pg_database: Database) -> None:
    with pytest.raises(StatementTimeoutError):
        async with pg_database.transaction(Tenant.all(), timeout_ms=50) as session:
            await session.execute(text("SELECT pg_sleep(5)"))
    assert pg_database.pool_status().checked_out == 0
    async with pg_database.transaction(Tenant.all()) as session:  # the pool is still healthy
        assert (await session.execute(text("SELECT 1"))).scalar_one() == 1


async def test_a_statement_whose_connection_is_dropped_ends_on_the_server(
    pg_database: Database,
) -> None:
    """A connection dropped mid-statement (the cleanup bound, or the driver invalidating
    it after a cancellation) leaves no statement running on: PostgreSQL checks the
    client's socket while it executes, instead of only between statements."""
    dropped = asyncio.Event()
    marker = f"dropped-{uuid.uuid4().hex}"

    async def slow() -> None:
        async with pg_database.transaction(Tenant.all()) as session:
            connection = await session.connection()
            raw = await connection.get_raw_connection()
            driver = raw.driver_connection
            assert driver is not None

            async def drop_once_running() -> None:
                await eventually(
                    lambda: _running(pg_database, marker), what="the sleep on the server"
                )
                driver.terminate()  # the socket closes; the backend is not told
                dropped.set()

            dropping = asyncio.create_task(drop_once_running())
            try:
                await session.execute(text(f"SELECT pg_sleep(600) /* {marker} */"))
            finally:
                await dropping

    with pytest.raises(Exception):  # noqa: B017, PT011  (whatever the driver says of a lost link)
        await slow()
    assert dropped.is_set()

    async def ended() -> bool:
        return not await _running(pg_database, marker)

    await eventually(ended, what="the dropped connection's statement ended on the server")


async def _running(database: Database, marker: str) -> bool:
    async with database.transaction(Tenant.all()) as session:
        count = (
            await session.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active'"
                    " AND query LIKE :pattern AND pid <> pg_backend_pid()"
                ),
                {"pattern": f"SELECT pg_sleep(600) /* {marker} */%"},
            )
        ).scalar_one()
    return bool(count)


async def test_cancelled_query_returns_its_connection_clean(pg_database: Database) -> None:
    started = asyncio.Event()

    async def slow() -> None:
        async with pg_database.transaction(Tenant.all()) as session:
            started.set()
            await session.execute(text("SELECT pg_sleep(600)"))  # only a cancel ends it

    async def sleeping() -> int:
        async with pg_database.transaction(Tenant.all()) as session:
            return int(
                (
                    await session.execute(
                        text(
                            "SELECT count(*) FROM pg_stat_activity"
                            " WHERE query LIKE 'SELECT pg_sleep(600)%' AND state = 'active'"
                        )
                    )
                ).scalar_one()
            )

    task = asyncio.create_task(slow())
    await eventually(started.is_set, what="the transaction begun")

    async def reached_the_server() -> bool:
        return await sleeping() == 1

    await eventually(reached_the_server, what="the sleep running on the server")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    assert pg_database.pool_status().checked_out == 0

    async def cancelled_on_the_server() -> bool:
        return await sleeping() == 0

    await eventually(cancelled_on_the_server, what="the server-side query cancelled too")


async def test_mariadb_statement_time_does_not_outlive_the_transaction(
    mariadb_database_url: str,
) -> None:
    """``max_statement_time`` has no transaction scope: the helper's bound must not follow
    the pooled connection to code that runs on the engine directly."""
    db = Database(DatabaseConfig(url=mariadb_database_url, pool_size=1, max_overflow=0))
    probe = text(
        "SELECT CONNECTION_ID(), @@session.max_statement_time, @@global.max_statement_time"
    )
    try:
        async with db.transaction(Tenant.all(), timeout_ms=1234) as session:
            inside = (await session.execute(probe)).one()
        assert inside[1] == pytest.approx(1.234)
        async with db.engine.connect() as conn:
            bare = (await conn.execute(probe)).one()
        assert bare[0] == inside[0]  # the same pooled connection
        assert bare[1] == bare[2]
        async with db.transaction(Tenant.all(), timeout_ms=4321) as session:
            again = (await session.execute(probe)).one()
        assert (again[0], again[1]) == (inside[0], pytest.approx(4.321))
    finally:
        await db.dispose()
