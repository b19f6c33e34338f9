"""Keyset pagination under concurrent writes; sessions, organizations, idempotency keys."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from argon2 import PasswordHasher

from db.engine import Database
from db.errors import AlreadyExistsError, NotFoundError, StaleEtagError, ValidationError
from db.models import Organization, User, utcnow
from db.repositories.idempotency import IdempotencyRepository
from db.repositories.organizations import OrganizationsRepository
from db.repositories.sessions import SessionsRepository
from db.repositories.users import UsersRepository
from db.tenancy import Tenant


async def _create_users(
    database: Database, tenant: Tenant, hasher: PasswordHasher, prefix: str, n: int
) -> list[User]:
    async with database.transaction(tenant) as session:
        repo = UsersRepository(session, tenant, password_hasher=hasher)
        return [
            await repo.create(
                email=f"{prefix}{i}@example.com", username=f"{prefix}{i}", password="password1"
            )
            for i in range(n)
        ]


@pytest.mark.parametrize("order_by", ["create_time", "create_time desc", "username, email desc"])
async def test_pagination_is_stable_under_concurrent_inserts(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher, order_by: str
) -> None:
    original = {u.id for u in await _create_users(database, tenant_a, cheap_hasher, "o", 17)}
    seen: list[uuid.UUID] = []
    cursor = None
    for page_number in range(50):
        async with database.transaction(tenant_a, read_only=True) as session:
            page = await UsersRepository(session, tenant_a).list(
                page_size=4, cursor=cursor, order_by=order_by
            )
        seen.extend(u.id for u in page.items)
        # Another writer inserts between every page (before and after the cursor position).
        await _create_users(database, tenant_a, cheap_hasher, f"n{page_number}x", 2)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert cursor is None, "pagination did not terminate"
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert original <= set(seen), "a row that existed throughout was missed"


async def test_foreign_cursor_is_rejected(database: Database, tenant_a: Tenant) -> None:
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a)
        with pytest.raises(ValidationError):
            await repo.list(cursor=["not-a-time", str(uuid.uuid4())])
        with pytest.raises(ValidationError):
            await repo.list(cursor=[1, 2, 3])


async def test_sessions_lifecycle(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    (user,) = await _create_users(database, tenant_a, cheap_hasher, "s", 1)
    async with database.transaction(tenant_a) as session:
        repo = SessionsRepository(session, tenant_a)
        created = await repo.create(user.id, ttl=timedelta(hours=1), user_agent="ua")
        short = await repo.create(user.id, ttl=timedelta(seconds=1))
        assert created.session.token_sha256 != created.token
        assert created.token not in created.session.token_sha256
        assert (await repo.authenticate(created.token)) is not None
        assert (await repo.authenticate("bogus")) is None
        later = utcnow() + timedelta(seconds=5)
        assert (await repo.authenticate(short.token, now=later)) is None  # expired
        active = await repo.list(user.id, now=later)
        assert [s.id for s in active.items] == [created.session.id]
        every = await repo.list(user.id, include_inactive=True)
        assert [s.id for s in every.items] == [short.session.id, created.session.id]
        revoked = await repo.revoke(created.session.id)
        first_revoke = revoked.revoke_time
        assert first_revoke is not None
        assert (await repo.revoke(created.session.id)).revoke_time == first_revoke
        assert (await repo.authenticate(created.token)) is None
        assert await repo.purge_inactive(before=utcnow() + timedelta(days=1)) == 2
    async with database.transaction(tenant_b) as session:
        with pytest.raises(NotFoundError):  # B cannot open a session for A's user
            await SessionsRepository(session, tenant_b).create(user.id, ttl=timedelta(hours=1))


async def test_organizations_crud(database: Database) -> None:
    admin = Tenant.all()
    async with database.transaction(admin) as session:
        repo = OrganizationsRepository(session, admin)
        org = await repo.create("Acme", create_by="root")
        renamed = await repo.update(org.id, {"display_name": "Acme Ltd"}, expected_version=1)
        assert renamed.display_name == "Acme Ltd"
        assert renamed.version == 2
        with pytest.raises(StaleEtagError):
            await repo.update(org.id, {"display_name": "x"}, expected_version=1)
        with pytest.raises(ValidationError):
            await repo.update(org.id, {"display_name": " "})
        await repo.soft_delete(org.id)
        assert org.id not in {o.id for o in (await repo.list()).items}
        assert org.id in {o.id for o in (await repo.list(show_deleted=True)).items}
        await repo.undelete(org.id)
    async with database.transaction(Tenant.of(org.id)) as session:
        own = OrganizationsRepository(session, Tenant.of(org.id))
        assert [o.id for o in (await own.list()).items] == [org.id]


async def test_idempotency_keys(database: Database, org_a: Organization, tenant_a: Tenant) -> None:
    async with database.transaction(tenant_a) as session:
        keys = IdempotencyRepository(session, tenant_a)
        assert await keys.get("/ferrule.v1.UserService/CreateUser", "r1") is None
        await keys.put("/ferrule.v1.UserService/CreateUser", "r1", b"first", "organizations/x")
    async with database.transaction(tenant_a) as session:
        keys = IdempotencyRepository(session, tenant_a)
        assert await keys.get("/ferrule.v1.UserService/CreateUser", "r1") == b"first"
        assert await keys.get("/ferrule.v1.UserService/OtherMethod", "r1") is None
    with pytest.raises(AlreadyExistsError):
        async with database.transaction(tenant_a) as session:
            await IdempotencyRepository(session, tenant_a).put(
                "/ferrule.v1.UserService/CreateUser", "r1", b"second"
            )
    async with database.transaction(Tenant.of(uuid.uuid4())) as session:
        other = IdempotencyRepository(session, Tenant.of(uuid.uuid4()))
        assert await other.get("/ferrule.v1.UserService/CreateUser", "r1") is None
    async with database.transaction(tenant_a) as session:
        keys = IdempotencyRepository(session, tenant_a)
        assert await keys.purge_older_than(utcnow() + timedelta(seconds=1)) == 1
        assert await keys.get("/ferrule.v1.UserService/CreateUser", "r1") is None
