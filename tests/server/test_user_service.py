"""ferrule.v1.UserService end to end: the real server on PostgreSQL (and SQLite for the
smoke test), called only through the published client.

Most tests share one server and database (started once for this module) and isolate
themselves by creating their own organization; tests that count rows only count rows
of their own organization.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import duration_pb2, field_mask_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from db.models.enums import AuthProvider, UserRole, UserStatus
from db.repositories.user_queries import UserQueries
from db.repositories.users import ProfileFields
from db.tenancy import Tenant
from ferrule.client import (
    Aborted,
    AlreadyExists,
    AsyncFerruleClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from ferrule.v1 import user_service_pb2 as pb
from server.app import FerruleApp
from tests.conftest import query
from tests.server.conftest import RunningServer, server_settings

PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
async def srv(module_database_url: str) -> AsyncIterator[RunningServer]:
    """One server on one fresh database for the whole module, on each server backend."""
    app = FerruleApp(server_settings(module_database_url))
    port = await app.start()
    running = RunningServer(app=app, database_url=module_database_url, target=f"127.0.0.1:{port}")
    yield running
    for client in running.clients:
        await client.close()
    await app.stop(grace=0.5)


@pytest.fixture
def admin(srv: RunningServer) -> AsyncFerruleClient:
    return srv.admin()


async def new_org(client: AsyncFerruleClient, display_name: str = "Acme") -> uuid.UUID:
    org = await client.users.CreateOrganization(
        pb.CreateOrganizationRequest(organization=pb.Organization(display_name=display_name))
    )
    return uuid.UUID(org.name.removeprefix("organizations/"))


@pytest.fixture
async def org(admin: AsyncFerruleClient) -> uuid.UUID:
    return await new_org(admin)


@pytest.fixture
def client(srv: RunningServer, org: uuid.UUID) -> AsyncFerruleClient:
    """A read-write JWT client for `org`, subject "alice-svc"."""
    return srv.for_org(org, subject="alice-svc")


def parent(org: uuid.UUID) -> str:
    return f"organizations/{org}"


async def create_user(
    client: AsyncFerruleClient,
    org: uuid.UUID,
    email: str,
    *,
    provider: pb.AuthProvider.ValueType = pb.AUTH_PROVIDER_GOOGLE,
    status: pb.UserStatus.ValueType = pb.USER_STATUS_ACTIVE,
    role: pb.UserRole.ValueType = pb.USER_ROLE_MEMBER,
    password: str = "",
    **fields: Any,
) -> pb.User:
    if provider == pb.AUTH_PROVIDER_EMAIL and not password:
        password = PASSWORD
    return await client.users.CreateUser(
        pb.CreateUserRequest(
            parent=parent(org),
            user=pb.User(email=email, role=role, status=status, auth_provider=provider, **fields),
            password=password,
        )
    )


def violation_fields(exc: InvalidArgument) -> set[str]:
    return {field for field, _ in exc.field_violations}


def assert_no_secret(*messages: Message) -> None:
    """Neither the password nor any argon2 hash appears in a response."""
    for message in messages:
        data = message.SerializeToString()
        assert PASSWORD.encode() not in data
        assert b"$argon2" not in data


async def count_users(srv: RunningServer, org: uuid.UUID) -> int:
    rows = await query(
        srv.database_url, "SELECT count(*) FROM users WHERE organization_id = :org", org=org
    )
    return int(rows[0][0])


# --- organizations ---------------------------------------------------------------------
async def test_organization_lifecycle(srv: RunningServer, admin: AsyncFerruleClient) -> None:
    chosen = uuid.uuid4()
    org = await admin.users.CreateOrganization(
        pb.CreateOrganizationRequest(
            organization=pb.Organization(display_name="  Initech "), organization_id=str(chosen)
        )
    )
    assert org.name == f"organizations/{chosen}"
    assert org.display_name == "Initech"
    assert org.etag and org.create_by == "admin-token" and not org.HasField("delete_time")

    with pytest.raises(AlreadyExists):
        await admin.users.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=pb.Organization(display_name="Again"), organization_id=str(chosen)
            )
        )
    retried = pb.CreateOrganizationRequest(
        organization=pb.Organization(display_name="Retried"), request_id=str(uuid.uuid4())
    )
    first = await admin.users.CreateOrganization(retried)
    assert await admin.users.CreateOrganization(retried) == first
    with pytest.raises(InvalidArgument) as bad:
        await admin.users.CreateOrganization(
            pb.CreateOrganizationRequest(
                organization=pb.Organization(display_name="x" * 201), organization_id="nope"
            )
        )
    assert violation_fields(bad.value) == {"organization.display_name", "organization_id"}

    # The organization's own write token may rename it, with optimistic concurrency.
    owner = srv.for_org(chosen, subject="owner-svc")
    assert (await owner.users.GetOrganization(pb.GetOrganizationRequest(name=org.name))) == org
    renamed = await owner.users.UpdateOrganization(
        pb.UpdateOrganizationRequest(
            organization=pb.Organization(name=org.name, display_name="Initrode", etag=org.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    assert renamed.display_name == "Initrode" and renamed.update_by == "owner-svc"
    assert renamed.etag != org.etag
    with pytest.raises(Aborted) as stale:
        await owner.users.UpdateOrganization(
            pb.UpdateOrganizationRequest(
                organization=pb.Organization(name=org.name, display_name="X", etag=org.etag)
            )
        )
    assert stale.value.reason == "ETAG_MISMATCH"
    with pytest.raises(InvalidArgument) as mask:
        await owner.users.UpdateOrganization(
            pb.UpdateOrganizationRequest(
                organization=pb.Organization(name=org.name, display_name="X"),
                update_mask=field_mask_pb2.FieldMask(paths=["create_time"]),
            )
        )
    assert violation_fields(mask.value) == {"update_mask"}

    # Admin-only RPCs refuse the organization's own token.
    with pytest.raises(PermissionDenied):
        await owner.users.DeleteOrganization(pb.DeleteOrganizationRequest(name=org.name))
    with pytest.raises(PermissionDenied):
        await owner.users.ListOrganizations(pb.ListOrganizationsRequest())
    with pytest.raises(PermissionDenied):
        await owner.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name="Mine"))
        )

    with pytest.raises(Aborted):
        await admin.users.DeleteOrganization(
            pb.DeleteOrganizationRequest(name=org.name, etag=org.etag)
        )
    deleted = await admin.users.DeleteOrganization(
        pb.DeleteOrganizationRequest(name=org.name, etag=renamed.etag)
    )
    assert deleted.HasField("delete_time") and deleted.delete_by == "admin-token"
    got = await admin.users.GetOrganization(pb.GetOrganizationRequest(name=org.name))
    assert got.HasField("delete_time")
    with pytest.raises(NotFound) as gone:
        await admin.users.DeleteOrganization(pb.DeleteOrganizationRequest(name=org.name))
    assert gone.value.resource_name == org.name
    with pytest.raises(NotFound):
        await admin.users.UpdateOrganization(
            pb.UpdateOrganizationRequest(
                organization=pb.Organization(name=org.name, display_name="Zombie")
            )
        )

    live = await admin.users.ListOrganizations(pb.ListOrganizationsRequest(page_size=1000))
    assert org.name not in {o.name for o in live.organizations}
    everything = await admin.users.ListOrganizations(
        pb.ListOrganizationsRequest(page_size=1000, show_deleted=True)
    )
    assert org.name in {o.name for o in everything.organizations}
    assert everything.total_size == live.total_size + 1

    restored = await admin.users.UndeleteOrganization(pb.UndeleteOrganizationRequest(name=org.name))
    assert not restored.HasField("delete_time") and restored.display_name == "Initrode"
    with pytest.raises(AlreadyExists):
        await admin.users.UndeleteOrganization(pb.UndeleteOrganizationRequest(name=org.name))
    missing = f"organizations/{uuid.uuid4()}"
    with pytest.raises(NotFound) as absent:
        await admin.users.GetOrganization(pb.GetOrganizationRequest(name=missing))
    assert absent.value.resource_name == missing
    with pytest.raises(InvalidArgument) as malformed:
        await admin.users.GetOrganization(pb.GetOrganizationRequest(name="organizations/abc"))
    assert violation_fields(malformed.value) == {"name"}


async def test_list_organizations_order_and_pages(admin: AsyncFerruleClient) -> None:
    tag = uuid.uuid4().hex[:8]
    for letter in "cab":
        await new_org(admin, f"{tag}-{letter}")
    seen: list[str] = []
    token = ""
    for _ in range(1000):
        page = await admin.users.ListOrganizations(
            pb.ListOrganizationsRequest(order_by="display_name", page_size=2, page_token=token)
        )
        seen += [o.display_name for o in page.organizations]
        token = page.next_page_token
        if not token:
            break
    ours = [name for name in seen if name.startswith(tag)]
    assert ours == [f"{tag}-a", f"{tag}-b", f"{tag}-c"]
    assert len(seen) == len(set(seen))
    with pytest.raises(InvalidArgument) as bad:
        await admin.users.ListOrganizations(pb.ListOrganizationsRequest(order_by="color"))
    assert violation_fields(bad.value) == {"order_by"}


# --- users -------------------------------------------------------------------------------
async def test_create_user_validation(
    srv: RunningServer, client: AsyncFerruleClient, admin: AsyncFerruleClient, org: uuid.UUID
) -> None:
    with pytest.raises(InvalidArgument) as bad:
        await client.users.CreateUser(
            pb.CreateUserRequest(
                parent=parent(org),
                user=pb.User(
                    email="not-an-email",
                    username="has space",
                    auth_provider=pb.AUTH_PROVIDER_EMAIL,
                    profile=pb.UserProfile(
                        time_zone="Mars/Olympus", avatar_uri="ftp://x/y", locale="!!"
                    ),
                ),
                user_id="123",
                password="short",
            )
        )
    assert violation_fields(bad.value) == {
        "user.email",
        "user.username",
        "user.role",
        "user.profile.time_zone",
        "user.profile.avatar_uri",
        "user.profile.locale",
        "user_id",
        "password",
    }
    assert bad.value.reason == "INVALID_ARGUMENT"
    with pytest.raises(InvalidArgument) as missing_password:
        await client.users.CreateUser(
            pb.CreateUserRequest(
                parent=parent(org),
                user=pb.User(
                    email="a@example.com",
                    role=pb.USER_ROLE_MEMBER,
                    auth_provider=pb.AUTH_PROVIDER_EMAIL,
                ),
            )
        )
    assert violation_fields(missing_password.value) == {"password"}
    with pytest.raises(InvalidArgument) as federated_password:
        await create_user(client, org, "b@example.com", password=PASSWORD)
    assert violation_fields(federated_password.value) == {"password"}
    with pytest.raises(InvalidArgument) as bad_parent:
        await client.users.CreateUser(pb.CreateUserRequest(parent="orgs/x"))
    assert violation_fields(bad_parent.value) == {"parent"}
    assert await count_users(srv, org) == 0

    nowhere = uuid.uuid4()
    with pytest.raises(NotFound) as no_org:
        await create_user(admin, nowhere, "c@example.com")
    assert no_org.value.resource_name == f"organizations/{nowhere}"


async def test_user_crud_masks_etags_and_soft_delete(
    client: AsyncFerruleClient, org: uuid.UUID
) -> None:
    user = await create_user(
        client,
        org,
        "Ada@Example.COM",
        provider=pb.AUTH_PROVIDER_EMAIL,
        status=pb.USER_STATUS_UNSPECIFIED,
        username="ada",
        full_name="Ada Lovelace",
        profile=pb.UserProfile(bio="math", locale="en-GB", time_zone="Europe/London"),
    )
    assert user.email == "ada@example.com"
    assert user.status == pb.USER_STATUS_PENDING_VERIFICATION
    assert user.has_password and user.create_by == "alice-svc"
    assert user.profile.time_zone == "Europe/London"
    assert_no_secret(user)
    assert await client.users.GetUser(pb.GetUserRequest(name=user.name)) == user

    missing = f"organizations/{org}/users/{uuid.uuid4()}"
    with pytest.raises(NotFound) as nf:
        await client.users.GetUser(pb.GetUserRequest(name=missing))
    assert nf.value.resource_name == missing

    with pytest.raises(AlreadyExists):
        await create_user(client, org, "ADA@example.com")

    # Explicit mask with nested profile paths: only those change.
    updated = await client.users.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(
                name=user.name,
                etag=user.etag,
                full_name="Countess",
                username="ignored-not-in-mask",
                profile=pb.UserProfile(bio="poet", locale="ignored"),
            ),
            update_mask=field_mask_pb2.FieldMask(paths=["full_name", "profile.bio"]),
        )
    )
    assert updated.full_name == "Countess" and updated.username == "ada"
    assert updated.profile.bio == "poet" and updated.profile.locale == "en-GB"
    assert updated.etag != user.etag and updated.update_by == "alice-svc"

    # Empty mask: only populated fields, and a partial profile keeps the other fields.
    implicit = await client.users.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(
                name=user.name, status=pb.USER_STATUS_ACTIVE, profile=pb.UserProfile(locale="fr")
            )
        )
    )
    assert implicit.status == pb.USER_STATUS_ACTIVE and implicit.profile.locale == "fr"
    assert implicit.profile.bio == "poet" and implicit.full_name == "Countess"

    # "profile" replaces the whole profile.
    cleared = await client.users.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(name=user.name, profile=pb.UserProfile(bio="only bio")),
            update_mask=field_mask_pb2.FieldMask(paths=["profile"]),
        )
    )
    assert cleared.profile == pb.UserProfile(bio="only bio")

    with pytest.raises(Aborted):
        await client.users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name=user.name, etag=user.etag, full_name="stale"),
                update_mask=field_mask_pb2.FieldMask(paths=["full_name"]),
            )
        )
    with pytest.raises(InvalidArgument) as output_only:
        await client.users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name=user.name),
                update_mask=field_mask_pb2.FieldMask(paths=["has_password", "create_time"]),
            )
        )
    assert violation_fields(output_only.value) == {"update_mask"}
    with pytest.raises(InvalidArgument) as bad_values:
        await client.users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name=user.name, email="nope", profile=pb.UserProfile(time_zone="X")),
                update_mask=field_mask_pb2.FieldMask(paths=["email", "role", "profile.time_zone"]),
            )
        )
    assert violation_fields(bad_values.value) == {
        "user.email",
        "user.role",
        "user.profile.time_zone",
    }

    other = await create_user(client, org, "grace@example.com")
    assert other.username == ""  # optional: absent stays absent
    with pytest.raises(AlreadyExists):
        await client.users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name=other.name, email="ada@example.com"),
                update_mask=field_mask_pb2.FieldMask(paths=["email"]),
            )
        )
    with pytest.raises(FailedPrecondition):
        await client.users.UpdateUser(
            pb.UpdateUserRequest(
                user=pb.User(name=other.name, auth_provider=pb.AUTH_PROVIDER_EMAIL),
                update_mask=field_mask_pb2.FieldMask(paths=["auth_provider"]),
            )
        )

    # Soft delete frees the email; undelete then conflicts with the new holder.
    with pytest.raises(Aborted):
        await client.users.DeleteUser(pb.DeleteUserRequest(name=user.name, etag=user.etag))
    deleted = await client.users.DeleteUser(pb.DeleteUserRequest(name=user.name))
    assert deleted.HasField("delete_time") and deleted.delete_by == "alice-svc"
    assert (await client.users.GetUser(pb.GetUserRequest(name=user.name))).HasField("delete_time")
    with pytest.raises(NotFound):
        await client.users.DeleteUser(pb.DeleteUserRequest(name=user.name))
    with pytest.raises(NotFound):
        await client.users.UpdateUser(
            pb.UpdateUserRequest(user=pb.User(name=user.name, full_name="zombie"))
        )
    listed = await client.users.ListUsers(pb.ListUsersRequest(parent=parent(org)))
    assert [u.name for u in listed.users] == [other.name]
    with_deleted = await client.users.ListUsers(
        pb.ListUsersRequest(parent=parent(org), show_deleted=True)
    )
    assert {u.name for u in with_deleted.users} == {user.name, other.name}
    assert with_deleted.total_size == 2

    successor = await create_user(client, org, "ada@example.com")
    with pytest.raises(AlreadyExists):
        await client.users.UndeleteUser(pb.UndeleteUserRequest(name=user.name))
    await client.users.DeleteUser(pb.DeleteUserRequest(name=successor.name))
    restored = await client.users.UndeleteUser(pb.UndeleteUserRequest(name=user.name))
    assert not restored.HasField("delete_time") and restored.email == "ada@example.com"
    with pytest.raises(AlreadyExists):
        await client.users.UndeleteUser(pb.UndeleteUserRequest(name=user.name))


async def test_list_users_filters_order_and_tokens(
    client: AsyncFerruleClient, org: uuid.UUID
) -> None:
    await create_user(client, org, "c@example.com", role=pb.USER_ROLE_ADMIN, username="zed")
    await create_user(client, org, "a@example.com", status=pb.USER_STATUS_SUSPENDED)
    await create_user(client, org, "b@example.com", provider=pb.AUTH_PROVIDER_EMAIL)

    newest_first = await client.users.ListUsers(pb.ListUsersRequest(parent=parent(org)))
    assert [u.email for u in newest_first.users] == [
        "b@example.com",
        "a@example.com",
        "c@example.com",
    ]
    by_email = await client.users.ListUsers(
        pb.ListUsersRequest(parent=parent(org), order_by="email desc")
    )
    assert [u.email for u in by_email.users] == ["c@example.com", "b@example.com", "a@example.com"]
    admins = await client.users.ListUsers(
        pb.ListUsersRequest(parent=parent(org), role=pb.USER_ROLE_ADMIN)
    )
    assert [u.email for u in admins.users] == ["c@example.com"] and admins.total_size == 1
    email_members = await client.users.ListUsers(
        pb.ListUsersRequest(
            parent=parent(org), auth_provider=pb.AUTH_PROVIDER_EMAIL, role=pb.USER_ROLE_MEMBER
        )
    )
    assert [u.email for u in email_members.users] == ["b@example.com"]
    assert_no_secret(email_members)

    first = await client.users.ListUsers(
        pb.ListUsersRequest(parent=parent(org), page_size=1, order_by="email")
    )
    assert first.next_page_token and first.total_size == 3
    with pytest.raises(InvalidArgument) as reused:
        await client.users.ListUsers(
            pb.ListUsersRequest(
                parent=parent(org),
                page_size=1,
                order_by="email desc",
                page_token=first.next_page_token,
            )
        )
    assert violation_fields(reused.value) == {"page_token"}
    with pytest.raises(InvalidArgument) as negative:
        await client.users.ListUsers(pb.ListUsersRequest(parent=parent(org), page_size=-1))
    assert violation_fields(negative.value) == {"page_size"}
    with pytest.raises(InvalidArgument) as unknown:
        await client.users.ListUsers(pb.ListUsersRequest(parent=parent(org), order_by="password"))
    assert violation_fields(unknown.value) == {"order_by"}


async def test_passwords_and_verify(
    srv: RunningServer, client: AsyncFerruleClient, org: uuid.UUID
) -> None:
    user = await create_user(
        client, org, "pat@example.com", provider=pb.AUTH_PROVIDER_EMAIL, password=PASSWORD
    )
    assert not user.HasField("last_login_time")
    ok = await client.users.VerifyPassword(
        pb.VerifyPasswordRequest(parent=parent(org), email="PAT@example.com", password=PASSWORD)
    )
    assert ok.valid and ok.user.name == user.name and ok.user.HasField("last_login_time")
    assert_no_secret(ok)

    answers = [
        await client.users.VerifyPassword(
            pb.VerifyPasswordRequest(parent=parent(org), email=email, password=password)
        )
        for email, password in [
            ("pat@example.com", "wrong password"),
            ("nobody@example.com", PASSWORD),
        ]
    ]
    assert all(not a.valid and not a.HasField("user") for a in answers)

    new_password = "another long passphrase"
    changed = await client.users.SetUserPassword(
        pb.SetUserPasswordRequest(name=user.name, password=new_password, etag=ok.user.etag)
    )
    assert changed.etag != ok.user.etag and changed.has_password
    assert_no_secret(changed)
    with pytest.raises(Aborted):
        await client.users.SetUserPassword(
            pb.SetUserPasswordRequest(name=user.name, password=new_password, etag=user.etag)
        )
    with pytest.raises(InvalidArgument) as weak:
        await client.users.SetUserPassword(pb.SetUserPasswordRequest(name=user.name, password="x"))
    assert violation_fields(weak.value) == {"password"}
    old = await client.users.VerifyPassword(
        pb.VerifyPasswordRequest(parent=parent(org), email="pat@example.com", password=PASSWORD)
    )
    assert not old.valid
    assert (
        await client.users.VerifyPassword(
            pb.VerifyPasswordRequest(
                parent=parent(org), email="pat@example.com", password=new_password
            )
        )
    ).valid

    # A user who is not ACTIVE never verifies, even with the right password.
    await client.users.UpdateUser(
        pb.UpdateUserRequest(
            user=pb.User(name=user.name, status=pb.USER_STATUS_SUSPENDED),
            update_mask=field_mask_pb2.FieldMask(paths=["status"]),
        )
    )
    suspended = await client.users.VerifyPassword(
        pb.VerifyPasswordRequest(parent=parent(org), email="pat@example.com", password=new_password)
    )
    assert not suspended.valid

    federated = await create_user(client, org, "fed@example.com")
    assert not federated.has_password
    with pytest.raises(FailedPrecondition):
        await client.users.SetUserPassword(
            pb.SetUserPasswordRequest(name=federated.name, password=PASSWORD)
        )
    with pytest.raises(InvalidArgument) as empty:
        await client.users.VerifyPassword(pb.VerifyPasswordRequest(parent=parent(org)))
    assert violation_fields(empty.value) == {"email", "password"}

    read_only = srv.for_org(org, scope="read")
    with pytest.raises(PermissionDenied):
        await read_only.users.VerifyPassword(
            pb.VerifyPasswordRequest(parent=parent(org), email="pat@example.com", password="x" * 8)
        )


async def test_lookup_search_and_statistics(client: AsyncFerruleClient, org: uuid.UUID) -> None:
    await create_user(
        client, org, "zoe+100%@example.com", username="zoe_1", role=pb.USER_ROLE_OWNER
    )
    await create_user(client, org, "bob@corp.example", username="bobby")
    await create_user(client, org, "amy@corp.example", status=pb.USER_STATUS_INACTIVE)
    gone = await create_user(client, org, "old@corp.example")
    await client.users.DeleteUser(pb.DeleteUserRequest(name=gone.name))

    found = await client.users.LookupUserByEmail(
        pb.LookupUserByEmailRequest(parent=parent(org), email="BOB@corp.example")
    )
    assert found.username == "bobby"
    with pytest.raises(NotFound):
        await client.users.LookupUserByEmail(
            pb.LookupUserByEmailRequest(parent=parent(org), email="old@corp.example")
        )
    with pytest.raises(InvalidArgument) as malformed:
        await client.users.LookupUserByEmail(
            pb.LookupUserByEmailRequest(parent=parent(org), email="bob")
        )
    assert violation_fields(malformed.value) == {"email"}

    corp = await client.users.SearchUsers(pb.SearchUsersRequest(parent=parent(org), query="CORP"))
    assert [u.email for u in corp.users] == ["amy@corp.example", "bob@corp.example"]
    literal = await client.users.SearchUsers(pb.SearchUsersRequest(parent=parent(org), query="0%"))
    assert [u.email for u in literal.users] == ["zoe+100%@example.com"]
    underscore = await client.users.SearchUsers(
        pb.SearchUsersRequest(parent=parent(org), query="_")
    )
    assert [u.username for u in underscore.users] == ["zoe_1"]
    paged = await client.users.SearchUsers(
        pb.SearchUsersRequest(parent=parent(org), query="example", page_size=2)
    )
    assert len(paged.users) == 2 and paged.next_page_token
    rest = await client.users.SearchUsers(
        pb.SearchUsersRequest(
            parent=parent(org), query="example", page_size=2, page_token=paged.next_page_token
        )
    )
    assert [u.email for u in rest.users] == ["zoe+100%@example.com"] and not rest.next_page_token
    with pytest.raises(InvalidArgument) as empty:
        await client.users.SearchUsers(pb.SearchUsersRequest(parent=parent(org), query=" "))
    assert violation_fields(empty.value) == {"query"}

    stats = await client.users.GetUserStatistics(pb.GetUserStatisticsRequest(parent=parent(org)))
    assert stats.total_users == 3 and stats.active_users == 2
    assert [(c.role, c.count) for c in stats.role_counts] == [
        (pb.USER_ROLE_MEMBER, 2),
        (pb.USER_ROLE_OWNER, 1),
    ]
    assert [(c.status, c.count) for c in stats.status_counts] == [
        (pb.USER_STATUS_ACTIVE, 2),
        (pb.USER_STATUS_INACTIVE, 1),
    ]
    assert [(c.auth_provider, c.count) for c in stats.auth_provider_counts] == [
        (pb.AUTH_PROVIDER_GOOGLE, 3)
    ]


# --- sessions ----------------------------------------------------------------------------
async def test_user_sessions(client: AsyncFerruleClient, org: uuid.UUID) -> None:
    user = await create_user(client, org, "sam@example.com")
    ttl = duration_pb2.Duration()
    ttl.FromTimedelta(timedelta(hours=2))
    request_id = str(uuid.uuid4())
    opened = await client.users.CreateUserSession(
        pb.CreateUserSessionRequest(
            parent=user.name,
            user_session=pb.UserSession(ttl=ttl, user_agent="pytest/1", ip_address="10.0.0.7"),
            request_id=request_id,
        )
    )
    assert opened.name.startswith(user.name + "/sessions/")
    assert len(opened.session_token) >= 43 and opened.state == pb.SESSION_STATE_ACTIVE
    assert opened.ip_address == "10.0.0.7" and opened.create_by == "alice-svc"
    lifetime = opened.expire_time.ToDatetime() - opened.create_time.ToDatetime()
    assert lifetime == timedelta(hours=2)
    again = await client.users.CreateUserSession(
        pb.CreateUserSessionRequest(
            parent=user.name, user_session=pb.UserSession(ttl=ttl), request_id=request_id
        )
    )
    # A replay is the same session without its token: the server never stored it.
    assert again.session_token == ""
    replayed_with_token = pb.UserSession()
    replayed_with_token.CopyFrom(again)
    replayed_with_token.session_token = opened.session_token
    assert replayed_with_token == opened

    fetched = await client.users.GetUserSession(pb.GetUserSessionRequest(name=opened.name))
    assert fetched.session_token == "" and fetched.name == opened.name
    default_expiry = await client.users.CreateUserSession(
        pb.CreateUserSessionRequest(parent=user.name)
    )
    assert default_expiry.expire_time.ToDatetime() - default_expiry.create_time.ToDatetime() == (
        timedelta(hours=24)
    )
    chosen = uuid.uuid4()
    expire = timestamp_pb2.Timestamp()
    expire.FromDatetime(datetime.now(UTC) + timedelta(days=3))
    explicit = await client.users.CreateUserSession(
        pb.CreateUserSessionRequest(
            parent=user.name,
            user_session=pb.UserSession(expire_time=expire),
            user_session_id=str(chosen),
        )
    )
    assert explicit.name == f"{user.name}/sessions/{chosen}" and explicit.expire_time == expire

    listed = await client.users.ListUserSessions(pb.ListUserSessionsRequest(parent=user.name))
    assert [s.name for s in listed.user_sessions] == [
        explicit.name,
        default_expiry.name,
        opened.name,
    ]
    assert listed.total_size == 3 and all(not s.session_token for s in listed.user_sessions)
    by_expiry = await client.users.ListUserSessions(
        pb.ListUserSessionsRequest(parent=user.name, order_by="expire_time", page_size=2)
    )
    assert [s.name for s in by_expiry.user_sessions] == [opened.name, default_expiry.name]

    revoked = await client.users.RevokeUserSession(pb.RevokeUserSessionRequest(name=opened.name))
    assert revoked.state == pb.SESSION_STATE_REVOKED and revoked.HasField("revoke_time")
    assert revoked.revoke_by == opened.create_by != ""
    assert (
        await client.users.RevokeUserSession(pb.RevokeUserSessionRequest(name=opened.name))
    ) == revoked
    active = await client.users.ListUserSessions(pb.ListUserSessionsRequest(parent=user.name))
    assert opened.name not in {s.name for s in active.user_sessions}
    every = await client.users.ListUserSessions(
        pb.ListUserSessionsRequest(parent=user.name, show_inactive=True)
    )
    assert every.total_size == 3

    bad_ttl = duration_pb2.Duration(seconds=5)
    with pytest.raises(InvalidArgument) as short:
        await client.users.CreateUserSession(
            pb.CreateUserSessionRequest(
                parent=user.name,
                user_session=pb.UserSession(ttl=bad_ttl, ip_address="999.1.1.1"),
                user_session_id="x",
            )
        )
    assert violation_fields(short.value) == {
        "user_session.ttl",
        "user_session.ip_address",
        "user_session_id",
    }
    other_user = await create_user(client, org, "other@example.com")
    wrong_parent = opened.name.replace(user.name, other_user.name)
    with pytest.raises(NotFound) as nf:
        await client.users.GetUserSession(pb.GetUserSessionRequest(name=wrong_parent))
    assert nf.value.resource_name == wrong_parent
    with pytest.raises(NotFound):
        await client.users.CreateUserSession(
            pb.CreateUserSessionRequest(parent=f"{parent(org)}/users/{uuid.uuid4()}")
        )
    pending = await create_user(
        client, org, "p@example.com", status=pb.USER_STATUS_PENDING_VERIFICATION
    )
    with pytest.raises(FailedPrecondition):
        await client.users.CreateUserSession(pb.CreateUserSessionRequest(parent=pending.name))

    # Deleting the user revokes its sessions, and it can open no more.
    await client.users.DeleteUser(pb.DeleteUserRequest(name=user.name))
    after = await client.users.ListUserSessions(
        pb.ListUserSessionsRequest(parent=user.name, show_inactive=True)
    )
    assert {s.state for s in after.user_sessions} == {pb.SESSION_STATE_REVOKED}
    with pytest.raises(FailedPrecondition):
        await client.users.CreateUserSession(pb.CreateUserSessionRequest(parent=user.name))


# --- security ---------------------------------------------------------------------------
async def test_without_token_unauthenticated_but_health_answers(
    srv: RunningServer, org: uuid.UUID
) -> None:
    anonymous = srv.client(token=None)
    with pytest.raises(Unauthenticated):
        await anonymous.users.GetOrganization(pb.GetOrganizationRequest(name=parent(org)))
    with pytest.raises(Unauthenticated):
        await anonymous.users.ListUsers(pb.ListUsersRequest(parent=parent(org)))
    health = health_pb2_grpc.HealthStub(anonymous.channel)
    answer = await health.Check(health_pb2.HealthCheckRequest(service=""))
    assert answer.status == health_pb2.HealthCheckResponse.SERVING


def _requests_for(org: uuid.UUID) -> list[tuple[str, Message]]:
    """One request per UserService RPC (admin-only ones too), all aimed at `org`."""
    org_name = parent(org)
    user = f"{org_name}/users/{uuid.uuid4()}"
    session = f"{user}/sessions/{uuid.uuid4()}"
    return [
        ("GetOrganization", pb.GetOrganizationRequest(name=org_name)),
        (
            "UpdateOrganization",
            pb.UpdateOrganizationRequest(
                organization=pb.Organization(name=org_name, display_name="x")
            ),
        ),
        ("DeleteOrganization", pb.DeleteOrganizationRequest(name=org_name)),
        ("UndeleteOrganization", pb.UndeleteOrganizationRequest(name=org_name)),
        (
            "CreateUser",
            pb.CreateUserRequest(
                parent=org_name,
                user=pb.User(
                    email="x@example.com",
                    role=pb.USER_ROLE_MEMBER,
                    auth_provider=pb.AUTH_PROVIDER_GOOGLE,
                ),
            ),
        ),
        ("GetUser", pb.GetUserRequest(name=user)),
        ("ListUsers", pb.ListUsersRequest(parent=org_name)),
        ("UpdateUser", pb.UpdateUserRequest(user=pb.User(name=user, full_name="x"))),
        ("DeleteUser", pb.DeleteUserRequest(name=user)),
        ("UndeleteUser", pb.UndeleteUserRequest(name=user)),
        ("SetUserPassword", pb.SetUserPasswordRequest(name=user, password=PASSWORD)),
        (
            "LookupUserByEmail",
            pb.LookupUserByEmailRequest(parent=org_name, email="x@example.com"),
        ),
        ("SearchUsers", pb.SearchUsersRequest(parent=org_name, query="x")),
        (
            "VerifyPassword",
            pb.VerifyPasswordRequest(parent=org_name, email="x@example.com", password=PASSWORD),
        ),
        ("GetUserStatistics", pb.GetUserStatisticsRequest(parent=org_name)),
        ("CreateUserSession", pb.CreateUserSessionRequest(parent=user)),
        ("GetUserSession", pb.GetUserSessionRequest(name=session)),
        ("ListUserSessions", pb.ListUserSessionsRequest(parent=user)),
        ("RevokeUserSession", pb.RevokeUserSessionRequest(name=session)),
    ]


async def test_other_tenant_is_permission_denied_everywhere(
    srv: RunningServer, admin: AsyncFerruleClient
) -> None:
    org_a, org_b = await new_org(admin, "A"), await new_org(admin, "B")
    for_a = srv.for_org(org_a, scope="read write admin")
    b_user = await create_user(admin, org_b, "b-only@example.com")
    await create_user(for_a, org_a, "a-only@example.com")

    requests = _requests_for(org_b)
    # Real names of B's resources too, so existence cannot be what is being refused.
    requests.append(("GetUser", pb.GetUserRequest(name=b_user.name)))
    for method, request in requests:
        with pytest.raises(PermissionDenied) as denied:
            await getattr(for_a.users, method)(request)
        assert denied.value.reason == "ORGANIZATION_MISMATCH", method
    rpcs = {m.name for m in pb.DESCRIPTOR.services_by_name["UserService"].methods}
    tenant_rpcs = rpcs - {"CreateOrganization", "ListOrganizations"}
    assert {method for method, _ in requests} == tenant_rpcs

    with pytest.raises(PermissionDenied):
        await for_a.users.CreateOrganization(
            pb.CreateOrganizationRequest(organization=pb.Organization(display_name="C"))
        )
    # A tenant-bound admin token sees only its own organization.
    orgs = await for_a.users.ListOrganizations(pb.ListOrganizationsRequest())
    assert [o.name for o in orgs.organizations] == [parent(org_a)]
    listed = await for_a.users.ListUsers(pb.ListUsersRequest(parent=parent(org_a)))
    assert [u.email for u in listed.users] == ["a-only@example.com"]


async def test_read_scope_cannot_write(srv: RunningServer, org: uuid.UUID) -> None:
    reader = srv.for_org(org, scope="read")
    await reader.users.ListUsers(pb.ListUsersRequest(parent=parent(org)))
    await reader.users.GetOrganization(pb.GetOrganizationRequest(name=parent(org)))
    writes = {
        "CreateUser",
        "UpdateUser",
        "DeleteUser",
        "UndeleteUser",
        "SetUserPassword",
        "VerifyPassword",
        "UpdateOrganization",
        "CreateUserSession",
        "RevokeUserSession",
        "DeleteOrganization",
        "UndeleteOrganization",
    }
    for method, request in _requests_for(org):
        if method in writes:
            with pytest.raises(PermissionDenied) as denied:
                await getattr(reader.users, method)(request)
            assert denied.value.reason == "MISSING_SCOPE", method
    assert await count_users(srv, org) == 0


# --- idempotency and pagination under concurrent writes ---------------------------------
async def test_retried_create_user_writes_one_row(
    srv: RunningServer, client: AsyncFerruleClient, org: uuid.UUID
) -> None:
    request = pb.CreateUserRequest(
        parent=parent(org),
        user=pb.User(
            email="once@example.com", role=pb.USER_ROLE_MEMBER, auth_provider=pb.AUTH_PROVIDER_EMAIL
        ),
        password=PASSWORD,
        request_id=str(uuid.uuid4()),
    )
    first = await client.users.CreateUser(request)
    retries = await asyncio.gather(*(client.users.CreateUser(request) for _ in range(3)))
    assert all(r == first for r in retries)
    assert await count_users(srv, org) == 1
    # Another request id is another create: the email is taken now.
    request.request_id = str(uuid.uuid4())
    with pytest.raises(AlreadyExists):
        await client.users.CreateUser(request)
    request.request_id = "not-a-uuid"
    with pytest.raises(InvalidArgument) as bad:
        await client.users.CreateUser(request)
    assert violation_fields(bad.value) == {"request_id"}


@pytest.fixture(scope="module")
async def thousand_users(srv: RunningServer) -> tuple[uuid.UUID, set[str]]:
    """An organization with 1000 users (and their emails), created once per backend for
    the paging tests: each only adds rows to it, and asserts only about these 1000 and
    the rows it saw. Written through the users repository in one transaction, as
    CreateUser writes them: the tests are about reading pages while others insert, and a
    thousand CreateUser calls cost seconds per backend."""
    org = await new_org(srv.admin(), "thousand")
    originals = {f"u{i:04d}-{uuid.uuid4().hex[:6]}@example.com" for i in range(1000)}
    tenant = Tenant.of(org)
    async with srv.app.database.transaction(tenant) as session:
        users = UserQueries(session, tenant)
        for email in sorted(originals):
            await users.create_user(
                email=email,
                username="",
                full_name=None,
                role=UserRole.MEMBER,
                status=UserStatus.ACTIVE,
                auth_provider=AuthProvider.GOOGLE,
                password=None,
                profile=ProfileFields(),
                create_by="svc-test",
                user_id=None,
            )
    return org, originals


@pytest.mark.parametrize("order_by", ["", "email"])
async def test_list_users_walks_1000_rows_under_concurrent_inserts(
    srv: RunningServer, thousand_users: tuple[uuid.UUID, set[str]], order_by: str
) -> None:
    org, originals = thousand_users
    client = srv.for_org(org, subject="alice-svc")

    stop = asyncio.Event()
    inserted: list[str] = []

    async def insert_while_paging() -> None:
        for i in range(10_000):
            if stop.is_set():
                return
            email = f"late{i:04d}-{uuid.uuid4().hex[:6]}@example.com"
            await create_user(client, org, email)
            inserted.append(email)

    writer = asyncio.create_task(insert_while_paging())
    seen: list[str] = []
    token = ""
    pages = 0
    try:
        for pages in range(1, 200):  # noqa: B007 (read after the loop)  # bounded: 1000+ rows in pages of 37
            page = await client.users.ListUsers(
                pb.ListUsersRequest(
                    parent=parent(org), page_size=37, page_token=token, order_by=order_by
                )
            )
            seen += [u.email for u in page.users]
            token = page.next_page_token
            if not token:
                break
            await asyncio.sleep(0)  # let the writer interleave
    finally:
        stop.set()
        await writer
    assert not token, "pagination did not finish"
    assert pages > 1000 // 37
    assert len(seen) == len(set(seen)), "a row was repeated"
    assert originals <= set(seen), f"{len(originals - set(seen))} rows missed"
    assert inserted, "no concurrent insert happened"


# --- both backends ----------------------------------------------------------------------
async def test_user_service_smoke_on_both_backends(any_server: RunningServer) -> None:
    admin = any_server.admin()
    org = await new_org(admin, "smoke")
    client = any_server.for_org(org)
    user = await create_user(client, org, "Smoke@Example.com", provider=pb.AUTH_PROVIDER_EMAIL)
    assert (await client.users.GetUser(pb.GetUserRequest(name=user.name))) == user
    verified = await client.users.VerifyPassword(
        pb.VerifyPasswordRequest(parent=parent(org), email="smoke@example.com", password=PASSWORD)
    )
    assert verified.valid
    session = await client.users.CreateUserSession(pb.CreateUserSessionRequest(parent=user.name))
    revoked = await client.users.RevokeUserSession(pb.RevokeUserSessionRequest(name=session.name))
    assert revoked.state == pb.SESSION_STATE_REVOKED
    deleted = await client.users.DeleteUser(
        pb.DeleteUserRequest(name=user.name, etag=verified.user.etag)
    )
    assert deleted.HasField("delete_time")
    listed = await client.users.ListUsers(
        pb.ListUsersRequest(parent=parent(org), show_deleted=True)
    )
    assert [u.name for u in listed.users] == [user.name]
    found = await client.users.SearchUsers(pb.SearchUsersRequest(parent=parent(org), query="smo"))
    assert list(found.users) == []
    stats = await client.users.GetUserStatistics(pb.GetUserStatisticsRequest(parent=parent(org)))
    assert stats.total_users == 0
    with pytest.raises(InvalidArgument):
        await client.users.GetUser(pb.GetUserRequest(name="organizations/x/users/y"))
