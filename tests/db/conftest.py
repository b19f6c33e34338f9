"""Data-layer fixtures: a database at head on each backend, organizations, a cheap hasher."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from argon2 import PasswordHasher

from db.engine import Database, DatabaseConfig
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
async def database(database_url: str) -> AsyncIterator[Database]:
    """The Database handle on a fresh database at head, on each backend; on PostgreSQL every
    transaction runs as the non-bypass app role, so every repository test also runs under
    row-level security."""
    app_role = APP_ROLE if database_url.startswith("postgresql") else None
    db = Database(DatabaseConfig(url=database_url, app_role=app_role, pool_size=5))
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
