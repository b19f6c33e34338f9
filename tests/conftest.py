"""Fixtures shared by every layer's tests: real PostgreSQL, real MariaDB, real Redis,
embedded SQLite.

Each test that needs a database gets a fresh one (created here, dropped afterwards), so
no test depends on state another test or session left behind. Databases at the head
revision are copies of a template migrated once (``tests/template_databases.py``); the
``empty_*`` fixtures give databases with no schema, for the migration tests. Under
``CI=true`` a missing PostgreSQL, MariaDB or Redis fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import asyncmy
import asyncpg
import pytest
import redis.asyncio as aioredis
from sqlalchemy import Row, Uuid, bindparam, text
from sqlalchemy.pool import NullPool

from db.engine_factory import async_engine
from tests.db.cache_fixtures import RedisProcess
from tests.template_databases import (
    ClonedDatabases,
    build_sqlite_template,
    clone_mariadb_database,
    clone_pg_database,
    clone_sqlite_database,
    drop_mariadb_database,
    drop_mariadb_databases,
    drop_pg_databases,
    ensure_mariadb_template,
    ensure_pg_template,
    mariadb_connect,
    with_database,
)

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TEST_MARIADB_URL = os.environ.get("TEST_MARIADB_URL", "mariadb+asyncmy://root@127.0.0.1:3306/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _driverless(url: str) -> str:
    """asyncpg wants ``postgresql://``; SQLAlchemy wants ``postgresql+asyncpg://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _unavailable(what: str, exc: BaseException) -> None:
    message = f"{what} is not reachable: {exc!r}"
    if IN_CI:
        pytest.fail(message + " (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
async def pg_admin_url() -> str:
    """URL (SQLAlchemy form) of a PostgreSQL database that may create other databases."""
    try:
        conn = await asyncpg.connect(_driverless(TEST_DATABASE_URL), timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _unavailable("PostgreSQL at TEST_DATABASE_URL", exc)
        raise
    await conn.close()
    return TEST_DATABASE_URL


@pytest.fixture(scope="session")
async def pg_template(pg_admin_url: str) -> str:
    """The migrated template database every PostgreSQL test database is cloned from."""
    return await ensure_pg_template(pg_admin_url)


@pytest.fixture(scope="session")
async def pg_databases(pg_admin_url: str, pg_template: str) -> AsyncIterator[ClonedDatabases]:
    """Where the tests' PostgreSQL databases come from and go back to."""
    databases = ClonedDatabases(pg_admin_url, pg_template, clone_pg_database, drop_pg_databases)
    yield databases
    await databases.aclose()


class CreateDatabase(Protocol):
    async def __call__(self, *, migrated: bool = True) -> str: ...


@pytest.fixture
def create_pg_database(
    pg_admin_url: str, pg_databases: ClonedDatabases
) -> Iterator[CreateDatabase]:
    """Factory: each call creates a database of its own and returns its SQLAlchemy URL:
    a clone of the migrated template, or an empty one with ``migrated=False``. They are
    dropped after the test."""
    created: list[str] = []

    async def create(*, migrated: bool = True) -> str:
        name = await pg_databases.take(migrated=migrated)
        created.append(name)
        return with_database(pg_admin_url, name)

    yield create
    pg_databases.release(created)


@pytest.fixture
async def pg_database_url(create_pg_database: CreateDatabase) -> str:
    """A fresh PostgreSQL database for this test, at the head revision."""
    return await create_pg_database()


@pytest.fixture
async def empty_pg_database_url(create_pg_database: CreateDatabase) -> str:
    """A fresh, empty PostgreSQL database (no schema) for this test."""
    return await create_pg_database(migrated=False)


@pytest.fixture(scope="session")
async def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The migrated SQLite file every SQLite test database is copied from."""
    return await build_sqlite_template(tmp_path_factory.mktemp("template") / "ferrule.db")


@pytest.fixture
def sqlite_database_url(sqlite_template: Path, tmp_path: Path) -> str:
    """A fresh SQLite file for this test (the embedded default's driver), at head."""
    return clone_sqlite_database(sqlite_template, tmp_path / "ferrule.db")


@pytest.fixture
def empty_sqlite_database_url(tmp_path: Path) -> str:
    """A fresh, empty SQLite file for this test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'ferrule.db'}"


@pytest.fixture(scope="session")
async def mariadb_admin_url() -> str:
    """URL (SQLAlchemy form) of a MariaDB server whose user may create databases."""
    try:
        conn = await mariadb_connect(TEST_MARIADB_URL)
    except (OSError, asyncmy.errors.Error) as exc:
        _unavailable("MariaDB at TEST_MARIADB_URL", exc)
        raise
    conn.close()
    return TEST_MARIADB_URL


@pytest.fixture(scope="session")
async def mariadb_template(mariadb_admin_url: str) -> str:
    """The migrated template database every MariaDB test database is copied from."""
    return await ensure_mariadb_template(mariadb_admin_url)


@pytest.fixture(scope="session")
async def mariadb_databases(
    mariadb_admin_url: str, mariadb_template: str
) -> AsyncIterator[ClonedDatabases]:
    """Where the tests' MariaDB databases come from and go back to."""
    databases = ClonedDatabases(
        mariadb_admin_url, mariadb_template, clone_mariadb_database, drop_mariadb_databases
    )
    yield databases
    await databases.aclose()


@pytest.fixture
def create_mariadb_database(
    mariadb_admin_url: str, mariadb_databases: ClonedDatabases
) -> Iterator[CreateDatabase]:
    """Factory: each call creates a MariaDB database of its own and returns its URL: a
    copy of the migrated template, or an empty one with ``migrated=False``. They are
    dropped after the test."""
    created: list[str] = []

    async def create(*, migrated: bool = True) -> str:
        name = await mariadb_databases.take(migrated=migrated)
        created.append(name)
        return with_database(mariadb_admin_url, name)

    yield create
    mariadb_databases.release(created)


@pytest.fixture
async def mariadb_database_url(create_mariadb_database: CreateDatabase) -> str:
    """A fresh MariaDB database for this test, at the head revision."""
    return await create_mariadb_database()


@pytest.fixture
async def empty_mariadb_database_url(create_mariadb_database: CreateDatabase) -> str:
    """A fresh, empty MariaDB database (no schema) for this test."""
    return await create_mariadb_database(migrated=False)


@pytest.fixture
def own_redis() -> Iterator[RedisProcess]:
    """A redis-server of this test's own, which it may kill, pause or restart."""
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


#: Backend -> the fixtures giving a fresh database on it: at head, and empty.
DATABASE_FIXTURES = {
    "postgresql": ("pg_database_url", "empty_pg_database_url"),
    "mariadb": ("mariadb_database_url", "empty_mariadb_database_url"),
    "sqlite": ("sqlite_database_url", "empty_sqlite_database_url"),
}


@pytest.fixture(params=list(DATABASE_FIXTURES))
def database_url(request: pytest.FixtureRequest) -> str:
    """The same test against every backend: a fresh database URL at the head revision.

    Sync on purpose: an async fixture cannot call ``getfixturevalue`` on another async
    fixture while the event loop runs.
    """
    url: str = request.getfixturevalue(DATABASE_FIXTURES[request.param][0])
    return url


@pytest.fixture(params=list(DATABASE_FIXTURES))
def empty_database_url(request: pytest.FixtureRequest) -> str:
    """The same test against every backend: a fresh, empty database URL (no schema)."""
    url: str = request.getfixturevalue(DATABASE_FIXTURES[request.param][1])
    return url


@pytest.fixture(scope="session")
async def redis_url() -> str:
    client = aioredis.Redis.from_url(TEST_REDIS_URL, socket_connect_timeout=2)
    try:
        await client.ping()
    except (OSError, aioredis.RedisError) as exc:
        _unavailable("Redis at TEST_REDIS_URL", exc)
        raise
    finally:
        await client.aclose()
    return TEST_REDIS_URL


@pytest.fixture
def redis_namespace() -> str:
    """A key prefix no other test uses, so tests never flush each other's keys."""
    return f"ferrule-test-{uuid.uuid4().hex[:12]}"


#: Server backends (everything but the embedded SQLite) -> the fixture of their admin URL.
ADMIN_URL_FIXTURES = {"postgresql": "pg_admin_url", "mariadb": "mariadb_admin_url"}


async def create_database(admin_url: str, template: str | None = None) -> str:
    """A fresh database on the server of ``admin_url`` (PostgreSQL or MariaDB): a copy of
    the migrated ``template``, or empty without one; its URL.

    For module-scoped fixtures, which cannot use the per-test factories; pair with
    :func:`drop_database`.
    """
    if admin_url.startswith("postgresql"):
        name = await clone_pg_database(admin_url, template)
    else:
        name = await clone_mariadb_database(admin_url, template)
    return with_database(admin_url, name)


@pytest.fixture(scope="module")
async def pg_module_database_url(pg_admin_url: str, pg_template: str) -> AsyncIterator[str]:
    """A PostgreSQL database at head shared by one module's tests (module-scoped servers);
    the tests isolate themselves in it by organization."""
    url = await create_database(pg_admin_url, pg_template)
    yield url
    await drop_database(pg_admin_url, url)


@pytest.fixture(scope="module")
async def mariadb_module_database_url(
    mariadb_admin_url: str, mariadb_template: str
) -> AsyncIterator[str]:
    """A MariaDB database at head shared by one module's tests (see the PostgreSQL one)."""
    url = await create_database(mariadb_admin_url, mariadb_template)
    yield url
    await drop_database(mariadb_admin_url, url)


#: Server backends -> the fixture of a module's shared database at head on it.
MODULE_DATABASE_FIXTURES = {
    "postgresql": "pg_module_database_url",
    "mariadb": "mariadb_module_database_url",
}


async def drop_database(admin_url: str, url: str) -> None:
    name = url.rpartition("/")[2]
    if admin_url.startswith("postgresql"):
        conn = await asyncpg.connect(_driverless(admin_url))
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
    else:
        await drop_mariadb_database(admin_url, name)


async def query(url: str, sql: str, **params: object) -> list[Row[Any]]:
    """Rows of ``sql`` (``:name`` parameters; UUID values bound as UUIDs) on any backend,
    read past the server (the way an operator would look at the table)."""
    statement = text(sql).bindparams(
        *(
            bindparam(key, type_=Uuid())
            for key, value in params.items()
            if isinstance(value, uuid.UUID)
        )
    )
    engine = async_engine(url, poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return list((await conn.execute(statement, params)).all())
    finally:
        await engine.dispose()
