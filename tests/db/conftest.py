"""Data-layer fixtures: a migrated database on each backend, organizations, a cheap hasher."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from argon2 import PasswordHasher

from db.engine import Database, DatabaseConfig
from db.migrate import upgrade_to_head
from db.models import Organization
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant

APP_ROLE = "ferrule_app"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """SQLAlchemy warnings (e.g. an accidental cartesian product) fail data-layer tests."""
    for item in items:
        if "tests/db/" in item.nodeid:
            item.add_marker(pytest.mark.filterwarnings("error::sqlalchemy.exc.SAWarning"))


@pytest.fixture
async def migrated_url(empty_database_url: str) -> str:
    """A fresh database on each backend, brought to head through Alembic."""
    await upgrade_to_head(empty_database_url)
    return empty_database_url


@pytest.fixture
async def database(migrated_url: str) -> AsyncIterator[Database]:
    """The Database handle; on PostgreSQL every transaction runs as the non-bypass app role,
    so every repository test also runs under row-level security."""
    app_role = APP_ROLE if migrated_url.startswith("postgresql") else None
    db = Database(DatabaseConfig(url=migrated_url, app_role=app_role, pool_size=5))
    yield db
    await db.dispose()


async def _create_org(database: Database, name: str) -> Organization:
    async with database.transaction(Tenant.all()) as session:
        return await OrganizationsRepository(session, Tenant.all()).create(name)


@pytest.fixture
async def org_a(database: Database) -> Organization:
    return await _create_org(database, "Org A")


@pytest.fixture
async def org_b(database: Database) -> Organization:
    return await _create_org(database, "Org B")


@pytest.fixture
def tenant_a(org_a: Organization) -> Tenant:
    return Tenant.of(org_a.id)


@pytest.fixture
def tenant_b(org_b: Organization) -> Tenant:
    return Tenant.of(org_b.id)


@pytest.fixture(scope="session")
def cheap_hasher() -> PasswordHasher:
    """argon2id with minimal cost: keeps tests fast; production uses the defaults."""
    return PasswordHasher(time_cost=1, memory_cost=8, parallelism=1)
