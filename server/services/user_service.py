"""ferrule.v1.UserService: organizations, users, profiles and login sessions.

Each RPC: authorize the name (permission before existence), validate every field, then
one deadline-bound transaction over the repositories. No SQL here; conversions live in
`user_convert`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from datetime import timedelta
from functools import cache
from typing import Any, cast

import grpc
from argon2.exceptions import VerificationError
from sqlalchemy.ext.asyncio import AsyncSession

from db.errors import FailedPreconditionError, NotFoundError
from db.models import AuthProvider, Organization, User, UserStatus, new_id, utcnow
from db.repositories.organizations import OrganizationsRepository, read_organization_record
from db.repositories.user_queries import OrganizationQueries, SessionQueries, UserQueries
from db.repositories.users import (
    DEFAULT_PASSWORD_HASHER,
    ProfileFields,
    UserFilter,
    read_user_record,
)
from db.tenancy import Tenant
from ferrule.v1 import user_service_pb2 as pb
from ferrule.v1 import user_service_pb2_grpc
from server import names
from server.authorization import PermissionDeniedError
from server.convert import to_datetime, to_timedelta
from server.dependencies import Dependencies
from server.etags import expected_version
from server.field_masks import resolve_update_mask
from server.idempotency import idempotent
from server.listing import page_request
from server.names import parse_resource_id
from server.scoping import (
    authorize,
    caller_subject,
    caller_tenant,
    primary_point_reader,
    transaction,
)
from server.services import cached_reads as cr
from server.services import user_convert as cv
from server.violations import Violations

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = "ferrule.v1.UserService"

USER_MUTABLE_PATHS = frozenset(
    {
        "email",
        "username",
        "full_name",
        "role",
        "status",
        "auth_provider",
        "profile",
        *(f"profile.{f}" for f in cv.PROFILE_FIELDS),
    }
)
#: The user fields GetUserStatistics counts by: changing one moves the counts.
USER_STATISTICS_FIELDS = frozenset({"role", "status", "auth_provider"})
USER_ORDER_FIELDS = ("create_time", "email", "username", "last_login_time")
DEFAULT_SESSION_TTL = timedelta(hours=24)
MIN_SESSION_TTL = timedelta(minutes=1)
MAX_SESSION_TTL = timedelta(days=30)


@cache
def _dummy_hash() -> str:
    """A real argon2id hash to verify against when there is no user, so that unknown
    emails cost the same hashing time as wrong passwords."""
    return DEFAULT_PASSWORD_HASHER.hash(uuid.uuid4().hex)


async def _burn_hash_time(password: str) -> None:
    dummy = _dummy_hash()
    with contextlib.suppress(VerificationError):
        await asyncio.to_thread(DEFAULT_PASSWORD_HASHER.verify, dummy, password)


def _require_live(user: User, name: str) -> None:
    if user.delete_time is not None:
        raise NotFoundError(names.USER.resource_type, name)


class UserServicer(user_service_pb2_grpc.UserServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps
        _dummy_hash()  # at startup, so the first unknown email costs no extra hash

    # --- organizations ---------------------------------------------------------------
    async def CreateOrganization(
        self, request: pb.CreateOrganizationRequest, context: Context
    ) -> pb.Organization:
        principal_tenant = caller_tenant()
        if not principal_tenant.all_organizations:
            # The new tenant cannot be inside a token bound to one existing organization.
            raise PermissionDeniedError(
                "creating an organization needs a token for all organizations",
                reason="ORGANIZATION_MISMATCH",
            )
        v = Violations()
        cv.check_display_name(v, request.organization.display_name, "organization.display_name")
        organization_id: uuid.UUID | None = None
        if request.organization_id:
            with v.collect():
                organization_id = parse_resource_id(request.organization_id, "organization_id")
        if request.request_id:
            with v.collect():
                parse_resource_id(request.request_id, "request_id")
        v.raise_if_any()
        chosen_id = organization_id or new_id()
        # All organizations (for RLS and the retry lookup) plus the new id, which owns the
        # idempotency key.
        tenant = Tenant(organization_id=chosen_id, all_organizations=True)
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.Organization:
            row = await OrganizationsRepository(session, tenant).create(
                request.organization.display_name.strip(),
                create_by=subject,
                organization_id=chosen_id,
            )
            return cv.organization_to_proto(row)

        return await idempotent(self.deps, tenant, request.request_id, pb.Organization, create)

    async def GetOrganization(
        self, request: pb.GetOrganizationRequest, context: Context
    ) -> pb.Organization:
        (organization_id,) = authorize(names.ORGANIZATION, request.name)
        tenant = Tenant.of(organization_id)

        async def load() -> pb.Organization:
            reader = primary_point_reader(self.deps, tenant)
            record = await read_organization_record(reader, organization_id)
            # Every column of Organization under the same name (organization_to_proto
            # reads only columns), as GetUser below.
            return cv.organization_to_proto(cast(Organization, record))

        return await cr.cached_get(
            self.deps, cr.ORGANIZATION, organization_id, organization_id, pb.Organization, load
        )

    async def ListOrganizations(
        self, request: pb.ListOrganizationsRequest, context: Context
    ) -> pb.ListOrganizationsResponse:
        tenant = caller_tenant()
        page = page_request(self.deps, request, request.order_by, request.show_deleted)
        async with transaction(self.deps, tenant, read_only=True) as session:
            result = await OrganizationQueries(session, tenant).list_ordered(
                order_by=request.order_by,
                page_size=page.page_size,
                cursor=page.cursor,
                show_deleted=request.show_deleted,
            )
            filled = page.fill(result, cv.organization_to_proto)
            return pb.ListOrganizationsResponse(
                organizations=filled.items,
                next_page_token=filled.next_page_token,
                total_size=result.total_size or 0,
            )

    async def UpdateOrganization(
        self, request: pb.UpdateOrganizationRequest, context: Context
    ) -> pb.Organization:
        organization = request.organization
        (organization_id,) = authorize(names.ORGANIZATION, organization.name, "organization.name")
        v = Violations()
        paths: set[str] = set()
        with v.collect():
            paths = resolve_update_mask(request.update_mask, organization, {"display_name"})
        if "display_name" in paths:
            cv.check_display_name(v, organization.display_name, "organization.display_name")
        version = None
        with v.collect():
            version = expected_version(organization.etag, "organization.etag")
        v.raise_if_any()
        changes = {"display_name": organization.display_name.strip()} if paths else {}
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.ORGANIZATION, organization_id, organization_id)
            row = await OrganizationsRepository(session, tenant).update(
                organization_id, changes, expected_version=version, update_by=caller_subject()
            )
            return cv.organization_to_proto(row)

    async def DeleteOrganization(
        self, request: pb.DeleteOrganizationRequest, context: Context
    ) -> pb.Organization:
        (organization_id,) = authorize(names.ORGANIZATION, request.name)
        version = expected_version(request.etag)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.ORGANIZATION, organization_id, organization_id)
            row = await OrganizationsRepository(session, tenant).soft_delete(
                organization_id, expected_version=version, delete_by=caller_subject()
            )
            return cv.organization_to_proto(row)

    async def UndeleteOrganization(
        self, request: pb.UndeleteOrganizationRequest, context: Context
    ) -> pb.Organization:
        (organization_id,) = authorize(names.ORGANIZATION, request.name)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.ORGANIZATION, organization_id, organization_id)
            row = await OrganizationsRepository(session, tenant).undelete(
                organization_id, update_by=caller_subject()
            )
            return cv.organization_to_proto(row)

    # --- users -----------------------------------------------------------------------
    async def CreateUser(self, request: pb.CreateUserRequest, context: Context) -> pb.User:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        user = request.user
        v = Violations()
        email = cv.check_email(v, user.email, "user.email")
        cv.check_username(v, user.username, "user.username")
        cv.check_full_name(v, user.full_name, "user.full_name")
        role = cv.role_from(v, user.role, "user.role", required=True)
        status = cv.status_from(v, user.status, "user.status", required=False)
        provider = cv.provider_from(v, user.auth_provider, "user.auth_provider", required=True)
        cv.check_profile(v, user.profile, "user.profile")
        if provider is AuthProvider.EMAIL:
            cv.check_password(v, request.password, "password")
        elif request.password:
            v.add("password", "only users with auth_provider EMAIL have a password")
        user_id: uuid.UUID | None = None
        if request.user_id:
            with v.collect():
                user_id = parse_resource_id(request.user_id, "user_id")
        if request.request_id:
            with v.collect():
                parse_resource_id(request.request_id, "request_id")
        v.raise_if_any()
        assert role is not None
        assert provider is not None
        tenant = Tenant.of(organization_id)
        subject = caller_subject()
        profile = ProfileFields(
            **{f: cv.none_if_empty(getattr(user.profile, f)) for f in cv.PROFILE_FIELDS}
        )

        async def create(session: AsyncSession) -> pb.User:
            # A missing or deleted organization is NOT_FOUND, not a foreign-key failure.
            await OrganizationsRepository(session, tenant).get(organization_id, show_deleted=False)
            row = await UserQueries(session, tenant).create_user(
                email=email,
                username=user.username,
                full_name=cv.none_if_empty(user.full_name),
                role=role,
                status=status or UserStatus.PENDING_VERIFICATION,
                auth_provider=provider,
                password=request.password or None,
                profile=profile,
                create_by=subject,
                user_id=user_id,
            )
            return cv.user_to_proto(row)

        # A new user has no cached entry (absence is never cached); the counts change.
        async with cr.invalidation(self.deps) as stale:
            stale.bump(cr.users_generation(organization_id))
            return await idempotent(self.deps, tenant, request.request_id, pb.User, create)

    async def GetUser(self, request: pb.GetUserRequest, context: Context) -> pb.User:
        organization_id, user_id = authorize(names.USER, request.name)

        async def load() -> pb.User:  # a miss only: the tenant is built here, not per hit
            reader = primary_point_reader(self.deps, Tenant.of(organization_id))
            record = await read_user_record(reader, user_id)
            # A UserRecord has every attribute of User that user_to_proto reads, under
            # the same names (db/repositories/users.py), so the two reads convert alike.
            return cv.user_to_proto(cast(User, record))

        return await cr.cached_get(self.deps, cr.USER, organization_id, user_id, pb.User, load)

    async def ListUsers(
        self, request: pb.ListUsersRequest, context: Context
    ) -> pb.ListUsersResponse:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        v = Violations()
        role = cv.role_from(v, request.role, "role", required=False)
        status = cv.status_from(v, request.status, "status", required=False)
        provider = cv.provider_from(v, request.auth_provider, "auth_provider", required=False)
        cv.check_order_by(v, request.order_by, USER_ORDER_FIELDS)
        v.raise_if_any()
        page = page_request(
            self.deps,
            request,
            request.parent,
            request.role,
            request.status,
            request.auth_provider,
            request.order_by,
            request.show_deleted,
        )
        tenant = Tenant.of(organization_id)
        user_filter = UserFilter(
            role=role, status=status, auth_provider=provider, show_deleted=request.show_deleted
        )
        async with transaction(self.deps, tenant, read_only=True) as session:
            result = await UserQueries(session, tenant).list(
                user_filter,
                page_size=page.page_size,
                cursor=page.cursor,
                order_by=request.order_by or "create_time desc",
                include_total=True,
            )
            filled = page.fill(result, cv.user_to_proto)
            return pb.ListUsersResponse(
                users=filled.items,
                next_page_token=filled.next_page_token,
                total_size=result.total_size or 0,
            )

    def _user_changes(self, request: pb.UpdateUserRequest, v: Violations) -> dict[str, Any]:
        """The repository changes named by the mask, validated."""
        user = request.user
        mask_paths: set[str] = set()
        with v.collect():
            if request.update_mask.paths:
                mask_paths = resolve_update_mask(request.update_mask, user, USER_MUTABLE_PATHS)
            else:
                # Without a mask only populated leaves change: a partly filled profile
                # must not clear its other fields.
                leaves = USER_MUTABLE_PATHS - {"profile"}
                mask_paths = resolve_update_mask(request.update_mask, user, leaves)
        if "profile" in mask_paths:
            mask_paths = (mask_paths - {"profile"}) | {f"profile.{f}" for f in cv.PROFILE_FIELDS}
        changes: dict[str, Any] = {}
        for path in sorted(mask_paths):
            field = f"user.{path}"
            if path == "email":
                changes["email"] = cv.check_email(v, user.email, field)
            elif path == "username":
                cv.check_username(v, user.username, field)
                v.check(bool(user.username), field, "cannot be cleared once set")
                changes["username"] = user.username
            elif path == "full_name":
                cv.check_full_name(v, user.full_name, field)
                changes["full_name"] = cv.none_if_empty(user.full_name)
            elif path == "role":
                changes["role"] = cv.role_from(v, user.role, field, required=True)
            elif path == "status":
                changes["status"] = cv.status_from(v, user.status, field, required=True)
            elif path == "auth_provider":
                changes["auth_provider"] = cv.provider_from(
                    v, user.auth_provider, field, required=True
                )
            else:
                name = path.removeprefix("profile.")
                value = getattr(user.profile, name)
                cv.check_profile_field(v, name, value, field)
                changes[name] = cv.none_if_empty(value)
        return changes

    async def UpdateUser(self, request: pb.UpdateUserRequest, context: Context) -> pb.User:
        organization_id, user_id = authorize(names.USER, request.user.name, "user.name")
        v = Violations()
        changes = self._user_changes(request, v)
        version = None
        with v.collect():
            version = expected_version(request.user.etag, "user.etag")
        v.raise_if_any()
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.USER, organization_id, user_id)
            if changes.keys() & USER_STATISTICS_FIELDS:
                stale.bump(cr.users_generation(organization_id))
            users = UserQueries(session, tenant)
            if changes.get("auth_provider") is AuthProvider.EMAIL:
                current = await users.get_user(user_id)
                _require_live(current, request.user.name)
                if current.password_hash is None:
                    raise FailedPreconditionError(
                        "the user has no password; an EMAIL user needs one (SetUserPassword"
                        " works only for EMAIL users, so create the user with EMAIL instead)"
                    )
                # Pin the version read, so a concurrent change cannot slip in between.
                version = current.version if version is None else version
            row = await users.update(
                user_id, changes, expected_version=version, update_by=caller_subject()
            )
            return cv.user_to_proto(row)

    async def DeleteUser(self, request: pb.DeleteUserRequest, context: Context) -> pb.User:
        organization_id, user_id = authorize(names.USER, request.name)
        version = expected_version(request.etag)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.USER, organization_id, user_id)
            stale.bump(cr.users_generation(organization_id))  # statistics count live users
            row = await UserQueries(session, tenant).soft_delete(
                user_id, expected_version=version, delete_by=caller_subject()
            )
            await SessionQueries(session, tenant).revoke_all_for_user(
                user_id, revoke_by=caller_subject()
            )
            return cv.user_to_proto(row)

    async def UndeleteUser(self, request: pb.UndeleteUserRequest, context: Context) -> pb.User:
        organization_id, user_id = authorize(names.USER, request.name)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.USER, organization_id, user_id)
            stale.bump(cr.users_generation(organization_id))
            row = await UserQueries(session, tenant).undelete(user_id, update_by=caller_subject())
            return cv.user_to_proto(row)

    async def SetUserPassword(
        self, request: pb.SetUserPasswordRequest, context: Context
    ) -> pb.User:
        organization_id, user_id = authorize(names.USER, request.name)
        v = Violations()
        cv.check_password(v, request.password, "password")
        version = None
        with v.collect():
            version = expected_version(request.etag)
        v.raise_if_any()
        tenant = Tenant.of(organization_id)
        # The etag, update time and has_password change; the statistics do not.
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.entity(cr.USER, organization_id, user_id)
            users = UserQueries(session, tenant)
            current = await users.get_user(user_id)
            _require_live(current, request.name)
            if current.auth_provider is not AuthProvider.EMAIL:
                raise FailedPreconditionError(
                    f"only EMAIL users have passwords; this user uses {current.auth_provider}"
                )
            row = await users.update(
                user_id,
                {"password": request.password},
                expected_version=current.version if version is None else version,
                update_by=caller_subject(),
            )
            return cv.user_to_proto(row)

    async def LookupUserByEmail(
        self, request: pb.LookupUserByEmailRequest, context: Context
    ) -> pb.User:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        v = Violations()
        email = cv.check_email(v, request.email, "email")
        v.raise_if_any()
        tenant = Tenant.of(organization_id)
        async with transaction(self.deps, tenant, read_only=True) as session:
            row = await UserQueries(session, tenant).get_by_email(email)
            return cv.user_to_proto(row)

    async def SearchUsers(
        self, request: pb.SearchUsersRequest, context: Context
    ) -> pb.SearchUsersResponse:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        v = Violations()
        v.check(
            len(request.query.strip()) > 0 and len(request.query) <= cv.MAX_QUERY,
            "query",
            f"required; 1 to {cv.MAX_QUERY} characters",
        )
        v.raise_if_any()
        page = page_request(self.deps, request, request.parent, request.query)
        tenant = Tenant.of(organization_id)
        async with transaction(self.deps, tenant, read_only=True) as session:
            result = await UserQueries(session, tenant).search_by_email(
                request.query, page_size=page.page_size, cursor=page.cursor
            )
            filled = page.fill(result, cv.user_to_proto)
            return pb.SearchUsersResponse(
                users=filled.items,
                next_page_token=filled.next_page_token,
            )

    async def VerifyPassword(
        self, request: pb.VerifyPasswordRequest, context: Context
    ) -> pb.VerifyPasswordResponse:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        v = Violations()
        email = cv.check_email(v, request.email, "email")
        v.check(
            0 < len(request.password) <= cv.MAX_PASSWORD,
            "password",
            f"required; at most {cv.MAX_PASSWORD} characters",
        )
        v.raise_if_any()
        tenant = Tenant.of(organization_id)
        # A successful check records the last login (and may rehash): the user's entry
        # goes, the statistics stay.
        async with (
            cr.invalidation(self.deps) as stale,
            transaction(self.deps, tenant) as session,
        ):
            users = UserQueries(session, tenant)
            user = await users.find_by_email(email)
            if (
                user is None
                or user.auth_provider is not AuthProvider.EMAIL
                or user.status is not UserStatus.ACTIVE
                or user.password_hash is None
            ):
                # Same answer and the same hashing cost as a wrong password.
                await _burn_hash_time(request.password)
                return pb.VerifyPasswordResponse(valid=False)
            stale.entity(cr.USER, organization_id, user.id)
            verified = await users.verify_password(user.id, request.password)
            if verified is None:
                return pb.VerifyPasswordResponse(valid=False)
            return pb.VerifyPasswordResponse(valid=True, user=cv.user_to_proto(verified))

    async def GetUserStatistics(
        self, request: pb.GetUserStatisticsRequest, context: Context
    ) -> pb.UserStatistics:
        (organization_id,) = authorize(names.ORGANIZATION, request.parent, "parent")
        tenant = Tenant.of(organization_id)

        async def load() -> pb.UserStatistics:
            async with cr.primary_read(self.deps, tenant) as session:
                stats = await UserQueries(session, tenant).statistics()
            return pb.UserStatistics(
                total_users=stats.total,
                active_users=stats.by_status.get(UserStatus.ACTIVE, 0),
                role_counts=[
                    pb.UserRoleCount(role=r, count=c)
                    for r, c in cv.counts_in_enum_order(pb.UserRole, stats.by_role)
                ],
                status_counts=[
                    pb.UserStatusCount(status=s, count=c)
                    for s, c in cv.counts_in_enum_order(pb.UserStatus, stats.by_status)
                ],
                auth_provider_counts=[
                    pb.AuthProviderCount(auth_provider=p, count=c)
                    for p, c in cv.counts_in_enum_order(pb.AuthProvider, stats.by_auth_provider)
                ],
            )

        return await cr.cached_statistics(
            self.deps,
            cr.USER_STATISTICS,
            cr.users_generation(organization_id),
            request,
            pb.UserStatistics,
            load,
        )

    # --- sessions --------------------------------------------------------------------
    # Sessions are not cached (their state depends on the clock) and no cached value
    # depends on them, so creating or revoking one invalidates nothing.
    async def CreateUserSession(
        self, request: pb.CreateUserSessionRequest, context: Context
    ) -> pb.UserSession:
        organization_id, user_id = authorize(names.USER, request.parent, "parent")
        spec = request.user_session
        v = Violations()
        now = utcnow()
        expire_time = now + DEFAULT_SESSION_TTL
        which = spec.WhichOneof("expiration")
        if which == "ttl":
            ttl = v.call(lambda: to_timedelta(spec.ttl, "user_session.ttl"))
            if ttl is not None:
                v.check(
                    MIN_SESSION_TTL <= ttl <= MAX_SESSION_TTL,
                    "user_session.ttl",
                    "1 minute to 30 days",
                )
                expire_time = now + min(ttl, MAX_SESSION_TTL)
        elif which == "expire_time":
            expire_time = to_datetime(spec.expire_time, "user_session.expire_time")
            v.check(
                now < expire_time <= now + MAX_SESSION_TTL,
                "user_session.expire_time",
                "in the future, at most 30 days ahead",
            )
        cv.check_user_agent(v, spec.user_agent, "user_session.user_agent")
        cv.check_ip_address(v, spec.ip_address, "user_session.ip_address")
        session_id: uuid.UUID | None = None
        if request.user_session_id:
            with v.collect():
                session_id = parse_resource_id(request.user_session_id, "user_session_id")
        if request.request_id:
            with v.collect():
                parse_resource_id(request.request_id, "request_id")
        v.raise_if_any()
        tenant = Tenant.of(organization_id)
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.UserSession:
            user = await UserQueries(session, tenant).get_user(user_id)
            if user.delete_time is not None or user.status is not UserStatus.ACTIVE:
                raise FailedPreconditionError(
                    f"{request.parent} is deleted or not ACTIVE; it cannot open sessions"
                )
            created = await SessionQueries(session, tenant).open(
                user_id,
                expire_time=expire_time,
                now=now,
                session_id=session_id,
                user_agent=cv.none_if_empty(spec.user_agent),
                peer=cv.none_if_empty(spec.ip_address),
                create_by=subject,
            )
            return cv.session_to_proto(created.session, now, token=created.token)

        return await idempotent(
            self.deps,
            tenant,
            request.request_id,
            pb.UserSession,
            create,
            secret_fields=("session_token",),
        )

    async def GetUserSession(
        self, request: pb.GetUserSessionRequest, context: Context
    ) -> pb.UserSession:
        organization_id, user_id, session_id = authorize(names.USER_SESSION, request.name)
        tenant = Tenant.of(organization_id)
        async with transaction(self.deps, tenant, read_only=True) as session:
            row = await SessionQueries(session, tenant).get_for_user(user_id, session_id)
            return cv.session_to_proto(row, utcnow())

    async def ListUserSessions(
        self, request: pb.ListUserSessionsRequest, context: Context
    ) -> pb.ListUserSessionsResponse:
        organization_id, user_id = authorize(names.USER, request.parent, "parent")
        page = page_request(
            self.deps, request, request.parent, request.order_by, request.show_inactive
        )
        tenant = Tenant.of(organization_id)
        now = utcnow()
        async with transaction(self.deps, tenant, read_only=True) as session:
            await UserQueries(session, tenant).get_user(user_id)  # NOT_FOUND for no user
            result = await SessionQueries(session, tenant).list_for_user(
                user_id,
                order_by=request.order_by,
                include_inactive=request.show_inactive,
                now=now,
                page_size=page.page_size,
                cursor=page.cursor,
            )
            filled = page.fill(result, lambda s: cv.session_to_proto(s, now))
            return pb.ListUserSessionsResponse(
                user_sessions=filled.items,
                next_page_token=filled.next_page_token,
                total_size=result.total_size or 0,
            )

    async def RevokeUserSession(
        self, request: pb.RevokeUserSessionRequest, context: Context
    ) -> pb.UserSession:
        organization_id, user_id, session_id = authorize(names.USER_SESSION, request.name)
        tenant = Tenant.of(organization_id)
        now = utcnow()
        async with transaction(self.deps, tenant) as session:
            row = await SessionQueries(session, tenant).revoke_for_user(
                user_id, session_id, now=now, revoke_by=caller_subject()
            )
            return cv.session_to_proto(row, now)


def add_to_server(server: grpc.aio.Server, deps: Dependencies) -> str:
    user_service_pb2_grpc.add_UserServiceServicer_to_server(UserServicer(deps), server)
    return SERVICE_NAME
