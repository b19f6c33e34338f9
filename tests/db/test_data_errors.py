"""The backstop behind the input boundary: a value the database refuses as data is a
ValidationError (INVALID_ARGUMENT), on each driver and each path that reaches it.

These calls go straight to the data layer, so nothing in front of it has checked the
values: each case forces one of the driver's data errors for real.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from sqlalchemy import text

from db.engine import Database, DatabaseConfig
from db.error_translation import translate_error
from db.errors import ValidationError
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from server.errors import map_exception
from tests.db.conftest import APP_ROLE

SECRET = "s3cret-value"


async def _database(url: str, app_role: str | None) -> AsyncIterator[Database]:
    db = Database(DatabaseConfig(url=url, app_role=app_role, pool_size=2))
    yield db
    await db.dispose()


@pytest.fixture
async def pg_database(pg_database_url: str) -> AsyncIterator[Database]:
    async for db in _database(pg_database_url, APP_ROLE):
        yield db


@pytest.fixture
async def sqlite_database(sqlite_database_url: str) -> AsyncIterator[Database]:
    async for db in _database(sqlite_database_url, None):
        yield db


async def create_org(database: Database, display_name: str) -> None:
    async with database.transaction(Tenant.all()) as session:
        await OrganizationsRepository(session, Tenant.all()).create(display_name)


def assert_invalid_argument_without_the_value(error: ValidationError) -> None:
    mapped = map_exception(error)
    assert mapped.code == grpc.StatusCode.INVALID_ARGUMENT
    assert SECRET not in mapped.status.SerializeToString().decode("utf-8", "replace")
    assert [v.field for v in error.violations] != []


async def test_a_lone_surrogate_is_invalid_argument_on_each_driver(database: Database) -> None:
    # asyncpg refuses to encode it (SQLSTATE 22000); sqlite3 raises UnicodeEncodeError.
    with pytest.raises(ValidationError) as refused:
        await create_org(database, f"{SECRET}\ud800")
    assert_invalid_argument_without_the_value(refused.value)


async def test_an_integer_beyond_64_bits_is_invalid_argument_on_each_driver(
    database: Database,
) -> None:
    # asyncpg: "value out of int64 range" (22000); sqlite3: OverflowError while binding;
    # MariaDB: out of range for the column (1264; it compares such a number as a decimal,
    # so only storing it fails).
    await create_org(database, "kept")
    with pytest.raises(ValidationError) as refused:
        async with database.transaction(Tenant.all()) as session:
            await session.execute(text("UPDATE organizations SET version = :v"), {"v": 2**70})
    assert_invalid_argument_without_the_value(refused.value)


async def test_postgres_data_exceptions_are_invalid_argument(pg_database: Database) -> None:
    """SQLite stores NUL and over-long text; PostgreSQL refuses them (class 22)."""
    database = pg_database
    with pytest.raises(ValidationError) as refused:
        await create_org(database, f"{SECRET}\x00")  # NUL in text
    assert getattr(refused.value.__cause__, "orig", None) is not None
    assert refused.value.__cause__.orig.sqlstate == "22021"  # type: ignore[union-attr]
    assert_invalid_argument_without_the_value(refused.value)
    # Longer than varchar(255) (the repository checks display_name itself: update raw).
    await create_org(database, "kept")
    with pytest.raises(ValidationError) as refused:
        async with database.transaction(Tenant.all()) as session:
            await session.execute(
                text("UPDATE organizations SET display_name = :v"), {"v": SECRET + "x" * 300}
            )
    assert refused.value.__cause__.orig.sqlstate == "22001"  # type: ignore[union-attr]
    assert_invalid_argument_without_the_value(refused.value)
    # jsonb refuses U+0000 (22P05) and NaN (22P02).
    for document in ('{"a": "\\u0000"}', '{"a": NaN}'):
        with pytest.raises(ValidationError):
            async with database.transaction(Tenant.all()) as session:
                await session.execute(text("SELECT CAST(:d AS jsonb)"), {"d": document})


@pytest.fixture
async def mariadb_database(mariadb_database_url: str) -> AsyncIterator[Database]:
    async for db in _database(mariadb_database_url, None):
        yield db


async def test_mariadb_data_errors_are_invalid_argument(mariadb_database: Database) -> None:
    """Strict mode makes MariaDB refuse what it would otherwise clip (the error numbers)."""
    database = mariadb_database
    await create_org(database, "kept")
    cases = (
        ("UPDATE organizations SET display_name = :v", SECRET + "x" * 300, 1406),
        ("UPDATE organizations SET version = :v", 2**40, 1264),
        ("UPDATE organizations SET id = :v", SECRET, 1292),
        ("UPDATE organizations SET create_time = :v", f"{SECRET}-13-45", 1292),
    )
    for statement, value, errno in cases:
        with pytest.raises(ValidationError) as refused:
            async with database.transaction(Tenant.all()) as session:
                await session.execute(text(statement), {"v": value})
        assert refused.value.__cause__.orig.args[0] == errno, statement  # type: ignore[union-attr]
        assert_invalid_argument_without_the_value(refused.value)


async def test_driver_level_errors_of_point_reads_are_invalid_argument(
    pg_database_url: str,
) -> None:
    """db.point_reads calls asyncpg directly: its PostgresError reaches translate_error."""
    conn = await asyncpg.connect(pg_database_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        for query, argument in (
            ("SELECT $1::text", f"{SECRET}\x00"),
            ("SELECT $1::uuid", SECRET),
        ):
            with pytest.raises(asyncpg.PostgresError) as raised:
                await conn.fetchval(query, argument)
            mapped = translate_error(raised.value)
            assert isinstance(mapped, ValidationError), (query, raised.value)
            assert_invalid_argument_without_the_value(mapped)
    finally:
        await conn.close()


async def test_sqlite_type_mismatch_is_invalid_argument(sqlite_database: Database) -> None:
    async def insert_text_as_rowid() -> None:
        async with sqlite_database.transaction(Tenant.all()) as session:
            await session.execute(text("CREATE TEMP TABLE rowids (id INTEGER PRIMARY KEY)"))
            await session.execute(text("INSERT INTO rowids (id) VALUES (:v)"), {"v": SECRET})

    with pytest.raises(ValidationError) as refused:
        await insert_text_as_rowid()
    assert_invalid_argument_without_the_value(refused.value)


def test_an_unexpected_exception_is_still_internal_without_detail() -> None:
    assert translate_error(RuntimeError(SECRET)) is None
    mapped = map_exception(RuntimeError(SECRET))
    assert mapped.code == grpc.StatusCode.INTERNAL
    assert mapped.status.message == "internal error"
    assert SECRET not in mapped.status.SerializeToString().decode("utf-8", "replace")


def test_a_random_id_is_not_mistaken_for_data() -> None:
    """Guard against over-matching: a unique violation stays ALREADY_EXISTS territory."""
    assert translate_error(ValueError(str(uuid.uuid4()))) is None
