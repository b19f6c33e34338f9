"""Fixtures shared by every layer's tests: real PostgreSQL, real Redis, embedded SQLite.

Each test that needs a database gets a fresh one (created here, dropped afterwards), so
no test depends on state another test or session left behind. Under ``CI=true`` a
missing PostgreSQL or Redis fails the run instead of skipping.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

TEST_DATABASE_URL = os.environ.get(
    "TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def _driverless(url: str) -> str:
    """asyncpg wants ``postgresql://``; SQLAlchemy wants ``postgresql+asyncpg://``."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_database(url: str, name: str) -> str:
    base, _, _ = url.rpartition("/")
    return f"{base}/{name}"


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


CreateDatabase = Callable[[], Awaitable[str]]


@pytest.fixture
async def create_pg_database(pg_admin_url: str) -> AsyncIterator[CreateDatabase]:
    """Factory: each call creates an empty database and returns its SQLAlchemy URL."""
    created: list[str] = []

    async def create() -> str:
        name = f"ferrule_test_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(_driverless(pg_admin_url))
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        created.append(name)
        return _with_database(pg_admin_url, name)

    yield create
    conn = await asyncpg.connect(_driverless(pg_admin_url))
    try:
        for name in created:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture
async def pg_database_url(create_pg_database: CreateDatabase) -> str:
    """A fresh, empty PostgreSQL database for this test."""
    return await create_pg_database()


@pytest.fixture
def sqlite_database_url(tmp_path: Path) -> str:
    """A fresh SQLite file for this test (the embedded default's driver)."""
    return f"sqlite+aiosqlite:///{tmp_path / 'ferrule.db'}"


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_database_url(request: pytest.FixtureRequest) -> str:
    """The same test against both backends: a fresh, empty database URL.

    Sync on purpose: an async fixture cannot call ``getfixturevalue`` on another async
    fixture while the event loop runs.
    """
    name = "pg_database_url" if request.param == "postgresql" else "sqlite_database_url"
    url: str = request.getfixturevalue(name)
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
