"""Row-level security on PostgreSQL: the app role sees and writes only its tenant's rows,
even through raw SQL that forgets the tenant filter."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from argon2 import PasswordHasher
from sqlalchemy import text

from db.engine import Database, DatabaseConfig
from db.errors import DomainError
from db.models import Organization
from db.repositories.organizations import OrganizationsRepository
from db.repositories.users import UsersRepository
from db.tenancy import Tenant
from tests.db.conftest import APP_ROLE


@pytest.fixture
async def rls_db(pg_database_url: str) -> AsyncIterator[Database]:
    db = Database(DatabaseConfig(url=pg_database_url, app_role=APP_ROLE, pool_size=2))
    yield db
    await db.dispose()


async def _seed(db: Database, cheap_hasher: PasswordHasher) -> tuple[Organization, Organization]:
    async with db.transaction(Tenant.all()) as session:
        orgs = OrganizationsRepository(session, Tenant.all())
        a, b = await orgs.create("A"), await orgs.create("B")
    for org in (a, b):
        async with db.transaction(Tenant.of(org.id)) as session:
            users = UsersRepository(session, Tenant.of(org.id), password_hasher=cheap_hasher)
            await users.create(email=f"u@{org.display_name}.io", username="u", password="password1")
    return a, b


async def test_role_is_not_owner_and_cannot_bypass(rls_db: Database) -> None:
    async with rls_db.transaction(Tenant.all()) as session:
        row = (
            await session.execute(
                text(
                    "SELECT current_user, r.rolbypassrls, r.rolsuper,"
                    " (SELECT tableowner FROM pg_tables WHERE tablename = 'users')"
                    " FROM pg_roles r WHERE r.rolname = current_user"
                )
            )
        ).one()
    assert row[0] == APP_ROLE
    assert row[1] is False
    assert row[2] is False
    assert row[3] != APP_ROLE


async def test_raw_query_without_filter_sees_only_own_tenant(
    rls_db: Database, cheap_hasher: PasswordHasher
) -> None:
    a, _ = await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant.of(a.id)) as session:
        emails = (await session.execute(text("SELECT email FROM users"))).scalars().all()
        orgs = (await session.execute(text("SELECT id FROM organizations"))).scalars().all()
        profiles = (await session.execute(text("SELECT count(*) FROM user_profiles"))).scalar()
    assert emails == ["u@a.io"]
    assert orgs == [a.id]
    assert profiles == 1
    async with rls_db.transaction(Tenant.all()) as session:
        total = (await session.execute(text("SELECT count(*) FROM users"))).scalar()
    assert total == 2


async def test_no_setting_matches_no_row(rls_db: Database, cheap_hasher: PasswordHasher) -> None:
    await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant(None)) as session:
        assert (await session.execute(text("SELECT count(*) FROM users"))).scalar() == 0
        assert (await session.execute(text("SELECT count(*) FROM organizations"))).scalar() == 0


async def test_cannot_write_other_tenants_rows(
    rls_db: Database, cheap_hasher: PasswordHasher
) -> None:
    a, b = await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant.of(a.id)) as session:
        updated = await session.execute(text("UPDATE users SET full_name = 'pwned'"))
        deleted = await session.execute(
            text("DELETE FROM users WHERE organization_id = :b"), {"b": b.id}
        )
        assert getattr(updated, "rowcount", None) == 1  # only A's own user
        assert getattr(deleted, "rowcount", None) == 0
    # Inserting a row for B while acting for A violates the policy's WITH CHECK.
    with pytest.raises(DomainError):
        async with rls_db.transaction(Tenant.of(a.id)) as session:
            await session.execute(
                text(
                    "INSERT INTO analysis_batches (id, organization_id, display_name, version)"
                    " VALUES (:id, :org, 'x', 1)"
                ),
                {"id": uuid.uuid4(), "org": b.id},
            )
    async with rls_db.transaction(Tenant.all()) as session:
        names = (
            (
                await session.execute(
                    text("SELECT full_name FROM users WHERE organization_id = :b"), {"b": b.id}
                )
            )
            .scalars()
            .all()
        )
    assert names == [None]
