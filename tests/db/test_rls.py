"""Row-level security on PostgreSQL: the app role sees and writes only its tenant's rows,
even through raw SQL that forgets the tenant filter."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from argon2 import PasswordHasher
from sqlalchemy import make_url, text

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


def _asyncpg_url(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


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


async def test_without_a_tenant_nothing_is_seen_or_written(
    rls_db: Database, pg_database_url: str, cheap_hasher: PasswordHasher
) -> None:
    """Neither setting ('' and 'off', as the transaction helper writes them for no tenant),
    and neither setting at all (a raw transaction of the app role): no row either way."""
    a, _ = await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant(None)) as session:
        for table in ("organizations", "users", "user_profiles"):
            count = (await session.execute(text(f"SELECT count(*) FROM {table}"))).scalar()
            assert count == 0, table
        updated = await session.execute(text("UPDATE users SET full_name = 'x'"))
        assert getattr(updated, "rowcount", None) == 0
    with pytest.raises(DomainError):
        async with rls_db.transaction(Tenant(None)) as session:
            await session.execute(
                text(
                    "INSERT INTO analysis_batches (id, organization_id, display_name, version)"
                    " VALUES (:id, :org, 'x', 1)"
                ),
                {"id": uuid.uuid4(), "org": a.id},
            )
    conn = await asyncpg.connect(_asyncpg_url(pg_database_url))
    try:
        async with conn.transaction():
            await conn.execute(f"SET LOCAL ROLE {APP_ROLE}")
            unset = "SELECT current_setting('ferrule.organization_id', true)"
            assert await conn.fetchval(unset) is None
            assert await conn.fetchval("SELECT count(*) FROM users") == 0
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(
                    "INSERT INTO analysis_batches (id, organization_id, display_name, version)"
                    " VALUES ($1, $2, 'x', 1)",
                    uuid.uuid4(),
                    a.id,
                )
    finally:
        await conn.close()


async def test_tenant_a_never_reads_or_moves_rows_of_tenant_b(
    rls_db: Database, cheap_hasher: PasswordHasher
) -> None:
    a, b = await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant.of(a.id)) as session:
        named_b = await session.execute(
            text("SELECT count(*) FROM users WHERE organization_id = :b"), {"b": b.id}
        )
        assert named_b.scalar() == 0
        by_org = await session.execute(
            text("SELECT id FROM organizations WHERE id = :b"), {"b": b.id}
        )
        assert by_org.all() == []
    # Moving A's own user to B fails the policy's WITH CHECK.
    with pytest.raises(DomainError):
        async with rls_db.transaction(Tenant.of(a.id)) as session:
            await session.execute(text("UPDATE users SET organization_id = :b"), {"b": b.id})
    async with rls_db.transaction(Tenant.all()) as session:
        owners = await session.execute(text("SELECT organization_id FROM users ORDER BY email"))
        assert owners.scalars().all() == [a.id, b.id]


async def test_a_prepared_statement_reads_the_tenant_of_each_execution(
    rls_db: Database, pg_database_url: str, cheap_hasher: PasswordHasher
) -> None:
    """The policies read the settings once per execution, not once per plan: a statement
    prepared on a connection (and planned generically after a few runs, as the point-read
    pool's are) follows the tenant the connection has when it runs."""
    a, b = await _seed(rls_db, cheap_hasher)
    conn = await asyncpg.connect(_asyncpg_url(pg_database_url))
    try:
        await conn.execute(f"SET ROLE {APP_ROLE}")
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        statement = await conn.prepare("SELECT organization_id FROM users")
        for org in (a, b, a, None, b):
            await conn.execute(
                "SELECT set_config('ferrule.organization_id', $1, false)",
                str(org.id) if org else "",
            )
            assert await statement.fetchval() == (org.id if org else None)
    finally:
        await conn.close()


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


async def test_the_policy_reads_the_tenant_settings_once_per_statement(
    rls_db: Database, cheap_hasher: PasswordHasher
) -> None:
    """The policy's settings are InitPlans (evaluated once, their results parameters of
    the per-row filter), never current_setting calls in the scan's own filter."""
    a, _ = await _seed(rls_db, cheap_hasher)
    async with rls_db.transaction(Tenant.of(a.id)) as session:
        explained = await session.execute(
            text(
                "EXPLAIN (VERBOSE, COSTS OFF, FORMAT JSON)"
                " SELECT count(*) FROM text_analyses WHERE delete_time IS NULL"
            )
        )
        raw = explained.scalar_one()
    nodes = list(_plan_nodes((json.loads(raw) if isinstance(raw, str) else raw)[0]["Plan"]))
    scans = [n for n in nodes if n.get("Relation Name") == "text_analyses"]
    assert len(scans) == 1, nodes
    scan_filter = scans[0].get("Filter", "")
    assert "organization_id" in scan_filter, scans[0]
    assert "current_setting" not in scan_filter, scans[0]
    init_plans = [n for n in nodes if n.get("Parent Relationship") == "InitPlan"]
    settings = sorted(
        setting
        for plan in init_plans
        for output in plan.get("Output", [])
        for setting in ("ferrule.organization_id", "ferrule.all_organizations")
        if f"current_setting('{setting}'" in output
    )
    assert settings == ["ferrule.all_organizations", "ferrule.organization_id"], init_plans
    # Only the InitPlans call current_setting: no other node's own fields mention it.
    calling = [
        n
        for n in nodes
        if n not in init_plans
        and "current_setting" in json.dumps({k: v for k, v in n.items() if k != "Plans"})
    ]
    assert calling == [], calling
