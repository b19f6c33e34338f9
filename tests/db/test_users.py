"""UsersRepository against both backends (under RLS on PostgreSQL)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import pytest
from argon2 import PasswordHasher
from sqlalchemy import event

from db.engine import Database
from db.errors import AlreadyExistsError, NotFoundError, StaleEtagError, ValidationError
from db.models import AuthProvider, Organization, User, UserRole, UserStatus
from db.repositories.users import ProfileFields, UserFilter, UsersRepository
from db.tenancy import Tenant


@pytest.fixture
async def users(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> AsyncIterator[UsersRepository]:
    """A repository in an open transaction for org A (committed at the end of the test)."""
    async with database.transaction(tenant_a) as session:
        yield UsersRepository(session, tenant_a, password_hasher=cheap_hasher)


@contextmanager
def count_statements(database: Database) -> Iterator[list[str]]:
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(statement)

    event.listen(database.engine.sync_engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", record)


async def _make(repo: UsersRepository, n: int) -> list[User]:
    return [
        await repo.create(email=f"user{i}@example.com", username=f"user{i}", password="password1")
        for i in range(n)
    ]


async def test_create_normalizes_email_hashes_password_and_makes_profile(
    users: UsersRepository,
) -> None:
    user = await users.create(
        email="  Ada@Example.COM ",
        username="ada",
        password="correct horse",
        profile=ProfileFields(bio="hi", locale="en-GB", time_zone="Europe/London"),
        create_by="tester",
    )
    assert user.email == "ada@example.com"
    assert user.password_hash is not None
    assert user.password_hash.startswith("$argon2id$")
    assert "correct horse" not in user.password_hash
    assert user.version == 1
    assert user.create_by == "tester"
    got = await users.get_user(user.id)
    assert got.profile is not None
    assert got.profile.bio == "hi"
    assert got.create_time.tzinfo is not None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"email": "not-an-email", "username": "x", "password": "password1"}, "email"),
        ({"email": "a@b.io", "username": " ", "password": "password1"}, "username"),
        ({"email": "a@b.io", "username": "x"}, "password"),
        ({"email": "a@b.io", "username": "x", "password": "short"}, "password"),
    ],
)
async def test_create_validates(users: UsersRepository, kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        await users.create(**kwargs)  # type: ignore[arg-type]
    assert caught.value.violations[0].field == field


async def test_federated_users_need_no_password(users: UsersRepository) -> None:
    user = await users.create(
        email="g@example.com", username="g", auth_provider=AuthProvider.GOOGLE
    )
    assert user.password_hash is None
    assert await users.verify_password(user.id, "anything") is None


async def test_duplicate_live_email_is_already_exists(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        await UsersRepository(session, tenant_a, password_hasher=cheap_hasher).create(
            email="dup@example.com", username="one", password="password1"
        )
    with pytest.raises(AlreadyExistsError) as caught:
        async with database.transaction(tenant_a) as session:
            await UsersRepository(session, tenant_a, password_hasher=cheap_hasher).create(
                email="DUP@example.com", username="two", password="password1"
            )
    assert caught.value.resource_type == "ferrule.v1.User"
    # Another organization may use the same email.
    async with database.transaction(tenant_b) as session:
        await UsersRepository(session, tenant_b, password_hasher=cheap_hasher).create(
            email="dup@example.com", username="three", password="password1"
        )


async def test_get_is_scoped_to_the_tenant(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        user = await UsersRepository(session, tenant_a, password_hasher=cheap_hasher).create(
            email="a@example.com", username="a", password="password1"
        )
    with pytest.raises(NotFoundError) as caught:
        async with database.transaction(tenant_b) as session:
            await UsersRepository(session, tenant_b).get_user(user.id)
    assert caught.value.resource_type == "ferrule.v1.User"
    assert str(user.id) in caught.value.resource_name
    async with database.transaction(Tenant.all()) as session:
        assert (await UsersRepository(session, Tenant.all()).get_user(user.id)).id == user.id


async def test_get_is_one_statement(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        user = await UsersRepository(session, tenant_a, password_hasher=cheap_hasher).create(
            email="a@example.com", username="a", password="password1"
        )
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a)
        with count_statements(database) as statements:
            got = await repo.get_user(user.id)
            assert got.profile is not None
    assert len(statements) == 1


async def test_list_with_profiles_has_no_n_plus_one(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        await _make(UsersRepository(session, tenant_a, password_hasher=cheap_hasher), 12)
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a)
        with count_statements(database) as statements:
            page = await repo.list(page_size=10)
            bios = [u.profile.bio if u.profile else "missing" for u in page.items]
    assert len(page.items) == 10
    assert "missing" not in bios
    assert len(statements) == 1


async def test_list_filters_and_show_deleted(users: UsersRepository) -> None:
    admin = await users.create(
        email="admin@example.com", username="admin", password="password1", role=UserRole.ADMIN
    )
    member = await users.create(email="m@example.com", username="m", password="password1")
    suspended = await users.create(
        email="s@example.com",
        username="s",
        password="password1",
        status=UserStatus.SUSPENDED,
    )
    github = await users.create(
        email="gh@example.com", username="gh", auth_provider=AuthProvider.GITHUB
    )
    await users.soft_delete(member.id)

    async def ids(f: UserFilter) -> set[object]:
        return {u.id for u in (await users.list(f)).items}

    assert await ids(UserFilter(role=UserRole.ADMIN)) == {admin.id}
    assert await ids(UserFilter(status=UserStatus.SUSPENDED)) == {suspended.id}
    assert await ids(UserFilter(auth_provider=AuthProvider.GITHUB)) == {github.id}
    assert await ids(UserFilter()) == {admin.id, suspended.id, github.id}
    assert await ids(UserFilter(show_deleted=True)) == {
        admin.id,
        member.id,
        suspended.id,
        github.id,
    }
    page = await users.list(UserFilter(), include_total=True, page_size=2)
    assert page.total_size == 3


async def test_list_order_by_and_pagination(users: UsersRepository) -> None:
    made = await _make(users, 7)
    by_email_desc = sorted(made, key=lambda u: u.email, reverse=True)
    seen: list[User] = []
    cursor = None
    for _ in range(10):
        page = await users.list(page_size=3, cursor=cursor, order_by="email desc")
        seen.extend(page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert [u.id for u in seen] == [u.id for u in by_email_desc]
    with pytest.raises(ValidationError):
        await users.list(order_by="password_hash")
    with pytest.raises(ValidationError):
        await users.list(order_by="email sideways")
    with pytest.raises(ValidationError):
        await users.list(page_size=-1)


async def test_list_by_last_login_pages_through_users_who_never_logged_in(
    users: UsersRepository,
) -> None:
    """A nullable sort column still gives a total order: never logged in sorts last desc."""
    made = await _make(users, 7)
    for user in made[:3]:
        assert await users.verify_password(user.id, "password1") is not None
    expected = [u.id for u in reversed(made[:3])] + sorted((u.id for u in made[3:]), reverse=True)
    seen: list[uuid.UUID] = []
    cursor = None
    for _ in range(10):
        page = await users.list(page_size=2, cursor=cursor, order_by="last_login_time desc")
        seen.extend(u.id for u in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == expected


async def test_update_partial_with_etag(users: UsersRepository) -> None:
    user = await users.create(email="u@example.com", username="u", password="password1")
    updated = await users.update(
        user.id,
        {"full_name": "Ursula", "role": UserRole.OWNER, "bio": "new bio"},
        expected_version=1,
        update_by="editor",
    )
    assert updated.version == 2
    assert updated.full_name == "Ursula"
    assert updated.role is UserRole.OWNER
    assert updated.username == "u"  # untouched
    assert updated.update_by == "editor"
    assert updated.profile is not None
    assert updated.profile.bio == "new bio"
    with pytest.raises(StaleEtagError):
        await users.update(user.id, {"full_name": "late"}, expected_version=1)
    with pytest.raises(ValidationError):
        await users.update(user.id, {"password_hash": "x"})
    with pytest.raises(NotFoundError):
        await users.update(uuid.uuid4(), {"full_name": "nobody"})


async def test_update_email_conflict_and_password_removal_rules(users: UsersRepository) -> None:
    first = await users.create(email="first@example.com", username="f", password="password1")
    second = await users.create(email="second@example.com", username="s", password="password1")
    with pytest.raises(AlreadyExistsError):
        await users.update(second.id, {"email": "FIRST@example.com"})
    assert first.id != second.id


async def test_removing_password_of_email_user_is_invalid(users: UsersRepository) -> None:
    user = await users.create(email="p@example.com", username="p", password="password1")
    with pytest.raises(ValidationError) as caught:
        await users.update(user.id, {"password": None})
    assert caught.value.violations[0].field == "password"


async def test_soft_delete_and_undelete(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a, password_hasher=cheap_hasher)
        user = await repo.create(email="d@example.com", username="d", password="password1")
        with pytest.raises(StaleEtagError):
            await repo.soft_delete(user.id, expected_version=9)
        deleted = await repo.soft_delete(user.id, expected_version=1, delete_by="remover")
        assert deleted.delete_time is not None
        assert deleted.delete_by == "remover"
        assert deleted.version == 2
        with pytest.raises(NotFoundError):
            await repo.soft_delete(user.id)
        with pytest.raises(NotFoundError):
            await repo.get_by_email("d@example.com")
        assert (await repo.get_user(user.id)).is_deleted  # AIP-164: Get still answers
        restored = await repo.undelete(user.id)
        assert restored.delete_time is None
        assert restored.version == 3
        with pytest.raises(AlreadyExistsError):
            await repo.undelete(user.id)  # not deleted
        await repo.soft_delete(user.id)
        await repo.create(email="d@example.com", username="d2", password="password1")
    with pytest.raises(AlreadyExistsError):
        async with database.transaction(tenant_a) as session:
            await UsersRepository(session, tenant_a).undelete(user.id)  # email taken meanwhile


async def test_get_by_email_and_search(users: UsersRepository) -> None:
    ada = await users.create(email="ada@example.com", username="Ada_Lovelace", password="pw123456")
    await users.create(email="bob@example.com", username="bobby", password="password1")
    percent = await users.create(email="100%@example.com", username="pct", password="password1")
    assert (await users.get_by_email("ADA@EXAMPLE.COM")).id == ada.id
    assert [u.id for u in (await users.search("LOVELACE")).items] == [ada.id]
    assert {u.id for u in (await users.search("example")).items} >= {ada.id, percent.id}
    # % and _ are literal: "a_l" only matches a literal underscore, "%" only a percent sign.
    assert [u.id for u in (await users.search("a_l")).items] == [ada.id]
    assert [u.id for u in (await users.search("0%@")).items] == [percent.id]
    assert ada.id in {u.id for u in (await users.search("_")).items}
    assert [u.id for u in (await users.search("b_b")).items] == []


async def test_verify_password_records_login_and_rehashes(
    database: Database, tenant_a: Tenant, cheap_hasher: PasswordHasher
) -> None:
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a, password_hasher=cheap_hasher)
        user = await repo.create(email="v@example.com", username="v", password="password1")
        assert await repo.verify_password(user.id, "wrong-password") is None
        checked = await repo.verify_password(user.id, "password1")
        assert checked is not None
        assert checked.last_login_time is not None
        old_hash = checked.password_hash
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a, password_hasher=stronger)
        rehashed = await repo.verify_password(user.id, "password1")
        assert rehashed is not None
        assert rehashed.password_hash != old_hash
        assert rehashed.password_hash is not None
        assert "t=2" in rehashed.password_hash
        assert await repo.verify_password(user.id, "password1") is not None


async def test_statistics_match_hand_counts(
    database: Database, tenant_a: Tenant, tenant_b: Tenant, cheap_hasher: PasswordHasher
) -> None:
    specs = [
        (UserRole.ADMIN, UserStatus.ACTIVE, AuthProvider.EMAIL),
        (UserRole.ADMIN, UserStatus.SUSPENDED, AuthProvider.GOOGLE),
        (UserRole.MEMBER, UserStatus.ACTIVE, AuthProvider.EMAIL),
        (UserRole.MEMBER, UserStatus.ACTIVE, AuthProvider.GITHUB),
        (UserRole.VIEWER, UserStatus.PENDING_VERIFICATION, AuthProvider.EMAIL),
    ]
    async with database.transaction(tenant_a) as session:
        repo = UsersRepository(session, tenant_a, password_hasher=cheap_hasher)
        made = []
        for i, (role, status, provider) in enumerate(specs):
            made.append(
                await repo.create(
                    email=f"s{i}@example.com",
                    username=f"s{i}",
                    role=role,
                    status=status,
                    auth_provider=provider,
                    password="password1" if provider is AuthProvider.EMAIL else None,
                )
            )
        await repo.soft_delete(made[-1].id)  # deleted users are not counted by default
    async with database.transaction(tenant_b) as session:  # another tenant's noise
        await UsersRepository(session, tenant_b, password_hasher=cheap_hasher).create(
            email="x@example.com", username="x", password="password1", role=UserRole.OWNER
        )
    async with database.transaction(tenant_a, read_only=True) as session:
        stats = await UsersRepository(session, tenant_a).statistics()
        with_deleted = await UsersRepository(session, tenant_a).statistics(include_deleted=True)
    assert stats.total == 4
    assert stats.by_role == {UserRole.ADMIN: 2, UserRole.MEMBER: 2}
    assert stats.by_status == {UserStatus.ACTIVE: 3, UserStatus.SUSPENDED: 1}
    assert stats.by_auth_provider == {
        AuthProvider.EMAIL: 2,
        AuthProvider.GOOGLE: 1,
        AuthProvider.GITHUB: 1,
    }
    assert with_deleted.total == 5
    assert with_deleted.by_role[UserRole.VIEWER] == 1


async def test_purge_removes_user_and_profile(users: UsersRepository, org_a: Organization) -> None:
    user = await users.create(email="gone@example.com", username="g", password="password1")
    await users.purge(user.id)
    with pytest.raises(NotFoundError):
        await users.get_user(user.id)
    with pytest.raises(NotFoundError):
        await users.purge(user.id)
