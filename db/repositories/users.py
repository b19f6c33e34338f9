"""Users of one organization: CRUD with etags and soft delete, lookup, search, passwords,
statistics. Profiles are loaded in the same statement as their users (no N+1)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute, joinedload

from db.errors import FieldViolation, ValidationError
from db.models import AuthProvider, User, UserProfile, UserRole, UserStatus, utcnow
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.point_reads import PointReader
from db.repositories.base import (
    RecordRead,
    Repository,
    domain_errors,
    matched_one,
    not_found_in,
    record_columns,
    scope_to_tenant,
)
from db.tenancy import Tenant

#: argon2id with the library's recommended parameters (RFC 9106 low-memory profile).
DEFAULT_PASSWORD_HASHER = PasswordHasher()

# Deliberately simple: one @, no spaces, a dot in the domain. Deliverability is the
# mail system's business; this only rejects what cannot be an address.
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_PROFILE_FIELDS = frozenset({"bio", "avatar_uri", "locale", "time_zone"})
_USER_FIELDS = frozenset(
    {"email", "username", "full_name", "role", "status", "auth_provider", "password"}
)
UPDATABLE_FIELDS = _USER_FIELDS | _PROFILE_FIELDS
MIN_PASSWORD_LENGTH = 8

#: Never logged in sorts as the epoch: first ascending, last descending.
NEVER = datetime(1970, 1, 1, tzinfo=UTC)
_ORDERABLE: dict[str, InstrumentedAttribute[Any] | SortKey] = {
    "create_time": User.create_time,
    "update_time": User.update_time,
    "email": User.email,
    "username": User.username,
    "last_login_time": SortKey(User.last_login_time, null_as=NEVER),
}
_DEFAULT_ORDER = (SortKey(User.create_time),)


def normalize_email(email: str) -> str:
    """Trimmed and lower-cased, or ValidationError on ``email``."""
    normalized = email.strip().lower()
    if len(normalized) > 320 or not _EMAIL.match(normalized):
        raise ValidationError([FieldViolation("email", "not a valid email address")])
    return normalized


def _check_username(username: str) -> str:
    username = username.strip()
    if not username or len(username) > 100:
        raise ValidationError([FieldViolation("username", "must be 1 to 100 characters")])
    return username


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValidationError(
            [FieldViolation("password", f"must be at least {MIN_PASSWORD_LENGTH} characters")]
        )


@dataclass(frozen=True, slots=True)
class UserFilter:
    role: UserRole | None = None
    status: UserStatus | None = None
    auth_provider: AuthProvider | None = None
    show_deleted: bool = False


@dataclass(frozen=True, slots=True)
class ProfileFields:
    bio: str | None = None
    avatar_uri: str | None = None
    locale: str | None = None
    time_zone: str | None = None


@dataclass(frozen=True, slots=True)
class UserStatistics:
    """Counts over the organization's users (live ones unless asked otherwise)."""

    total: int
    by_role: Mapping[UserRole, int] = field(default_factory=dict)
    by_status: Mapping[UserStatus, int] = field(default_factory=dict)
    by_auth_provider: Mapping[AuthProvider, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """A user's profile as read by :meth:`UsersRepository.get_user_record`."""

    bio: str | None
    avatar_uri: str | None
    locale: str | None
    time_zone: str | None


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A read-only user with its profile: the columns of :class:`User` under the same
    names (``profile`` as on the model), without ORM identity or instrumentation.

    ``profile`` comes first so the columns can follow it positionally, in select order."""

    profile: ProfileRecord | None
    id: uuid.UUID
    organization_id: uuid.UUID
    email: str
    username: str
    full_name: str | None
    role: UserRole
    status: UserStatus
    auth_provider: AuthProvider
    password_hash: str | None
    last_login_time: datetime | None
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None
    create_by: str | None
    update_by: str | None
    delete_by: str | None
    version: int


_USERS = User.__table__
_PROFILES = UserProfile.__table__
_RECORD_COLUMNS = record_columns(_USERS, UserRecord, skip=1)
_PROFILE_COLUMNS = (
    _PROFILES.c.user_id,
    _PROFILES.c.bio,
    _PROFILES.c.avatar_uri,
    _PROFILES.c.locale,
    _PROFILES.c.time_zone,
)
_RECORD_WIDTH = len(_RECORD_COLUMNS)


def _user_record(row: Sequence[Any]) -> UserRecord:
    profile = None
    if row[_RECORD_WIDTH] is not None:
        profile = ProfileRecord(*row[_RECORD_WIDTH + 1 :])
    return UserRecord(profile, *row[:_RECORD_WIDTH])


class UsersRepository(Repository[User]):
    model = User
    resource_type = "ferrule.v1.User"
    collection = "users"
    load_options = (joinedload(User.profile),)

    def __init__(
        self,
        session: AsyncSession,
        tenant: Tenant,
        *,
        password_hasher: PasswordHasher = DEFAULT_PASSWORD_HASHER,
    ) -> None:
        super().__init__(session, tenant)
        self.hasher = password_hasher

    async def _hash(self, password: str) -> str:
        # argon2 is deliberately slow (tens of ms): keep it off the event loop.
        return await asyncio.to_thread(self.hasher.hash, password)

    def _with_profile(self, *, show_deleted: bool) -> Any:
        return self.select(show_deleted=show_deleted).options(joinedload(User.profile))

    async def get_user(self, user_id: uuid.UUID, *, show_deleted: bool = True) -> User:
        """The user with its profile, in one statement."""
        return await self.get(
            user_id, show_deleted=show_deleted, options=(joinedload(User.profile),)
        )

    async def get_user_record(self, user_id: uuid.UUID, *, show_deleted: bool = True) -> UserRecord:
        """:meth:`get_user` for reads that only convert the row: one prebuilt Core
        statement on the session's connection, no ORM identity map or loading."""
        return await _USER_RECORD.read_in(
            self.session, self.tenant, user_id, show_deleted=show_deleted
        )

    async def create(
        self,
        *,
        email: str,
        username: str,
        full_name: str | None = None,
        role: UserRole = UserRole.MEMBER,
        status: UserStatus = UserStatus.ACTIVE,
        auth_provider: AuthProvider = AuthProvider.EMAIL,
        password: str | None = None,
        profile: ProfileFields | None = None,
        create_by: str | None = None,
        user_id: uuid.UUID | None = None,
    ) -> User:
        """A new live user with a profile. AlreadyExistsError if a live user has the email."""
        organization_id = self.tenant.require_organization()
        email = normalize_email(email)
        username = _check_username(username)
        if auth_provider is AuthProvider.EMAIL and not password:
            raise ValidationError([FieldViolation("password", "required for EMAIL users")])
        password_hash = None
        if password:
            _check_password(password)
            password_hash = await self._hash(password)
        profile = profile or ProfileFields()
        user = User(
            organization_id=organization_id,
            email=email,
            username=username,
            full_name=full_name,
            role=role,
            status=status,
            auth_provider=auth_provider,
            password_hash=password_hash,
            create_by=create_by,
            update_by=create_by,
        )
        if user_id is not None:
            user.id = user_id
        user.profile = UserProfile(
            organization_id=organization_id,
            bio=profile.bio,
            avatar_uri=profile.avatar_uri,
            locale=profile.locale,
            time_zone=profile.time_zone,
        )
        self.session.add(user)
        async with domain_errors(
            self.resource_type, email, conflict_message=f"a user with email {email!r} exists"
        ):
            await self.session.flush()
        return user

    async def list(
        self,
        filter: UserFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[User]:
        """A keyset page of users with their profiles (one statement; two with the total)."""
        filter = filter or UserFilter()
        stmt = self._with_profile(show_deleted=filter.show_deleted)
        if filter.role is not None:
            stmt = stmt.where(User.role == filter.role)
        if filter.status is not None:
            stmt = stmt.where(User.status == filter.status)
        if filter.auth_provider is not None:
            stmt = stmt.where(User.auth_provider == filter.auth_provider)
        keys = parse_order_by(order_by, _ORDERABLE, default=_DEFAULT_ORDER, tiebreaker=User.id)
        return await paginate(
            self.session,
            stmt,
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )

    async def get_by_email(self, email: str) -> User:
        """The live user with this email (any case), or NotFoundError."""
        normalized = normalize_email(email)
        stmt = self._with_profile(show_deleted=False).where(User.email == normalized)
        user: User | None = (await self.session.execute(stmt)).unique().scalar_one_or_none()
        if user is None:
            raise self.not_found(f"email:{normalized}")
        return user

    async def search(
        self,
        query: str,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        show_deleted: bool = False,
    ) -> Page[User]:
        """Users whose email or username contains ``query``, case-insensitively.

        ``%`` and ``_`` in the query are literal characters, not wildcards.
        """
        needle = query.strip().lower()
        if not needle:
            raise ValidationError([FieldViolation("query", "must not be empty")])
        stmt = self._with_profile(show_deleted=show_deleted).where(
            or_(
                User.email.contains(needle, autoescape=True),
                func.lower(User.username).contains(needle, autoescape=True),
            )
        )
        keys = [SortKey(User.create_time), SortKey(User.id)]
        return await paginate(self.session, stmt, keys, page_size=page_size, cursor=cursor)

    async def update(
        self,
        user_id: uuid.UUID,
        changes: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
    ) -> User:
        """Apply the changed fields (user and profile fields alike) to a live user.

        ``changes`` holds only the fields named by the caller's field mask; ``password``
        is hashed. StaleEtagError when ``expected_version`` is given and not current.
        """
        unknown = sorted(set(changes) - UPDATABLE_FIELDS)
        if unknown:
            raise ValidationError([FieldViolation(name, "cannot be updated") for name in unknown])
        values: dict[str, Any] = {}
        for name in _USER_FIELDS & set(changes):
            value = changes[name]
            if name == "email":
                value = normalize_email(value)
            elif name == "username":
                value = _check_username(value)
            elif name in {"role", "status", "auth_provider"} and value is None:
                raise ValidationError([FieldViolation(name, "must be set")])
            if name == "password":
                if value is None:
                    values["password_hash"] = None
                    continue
                _check_password(value)
                values["password_hash"] = await self._hash(value)
                continue
            values[name] = value
        profile_values = {name: changes[name] for name in _PROFILE_FIELDS & set(changes)}
        now = utcnow()
        values.update(update_time=now, update_by=update_by)
        await self._versioned_update(
            user_id,
            values,
            expected_version=expected_version,
            deleted=False,
            conflict_message="a user with this email exists",
        )
        if profile_values:
            await self._update_profile(user_id, {**profile_values, "update_time": now})
        return await self.get(user_id, options=(joinedload(User.profile),), populate_existing=True)

    async def _update_profile(self, user_id: uuid.UUID, values: Mapping[str, Any]) -> None:
        stmt = (
            scope_to_tenant(update(UserProfile), UserProfile.organization_id, self.tenant)
            .where(UserProfile.user_id == user_id)
            .values(**values)
        )
        if not await matched_one(self.session, stmt):
            # Users created outside this repository may lack a profile row.
            organization_id = self.tenant.organization_id
            if organization_id is None:
                user = await self.get(user_id)
                organization_id = user.organization_id
            self.session.add(
                UserProfile(user_id=user_id, organization_id=organization_id, **values)
            )
            await self.session.flush()

    async def verify_password(self, user_id: uuid.UUID, password: str) -> User | None:
        """The user when ``password`` is right (recording the login), else None.

        Users without a password (federated providers) never verify. A hash made with
        older parameters is replaced by one with the current parameters.
        """
        user = await self.get(user_id, show_deleted=False)
        if user.password_hash is None:
            return None
        try:
            await asyncio.to_thread(self.hasher.verify, user.password_hash, password)
        except (VerificationError, InvalidHashError):
            return None
        now = utcnow()
        values: dict[str, Any] = {"last_login_time": now}
        if self.hasher.check_needs_rehash(user.password_hash):
            values["password_hash"] = await self._hash(password)
        await self._versioned_update(user_id, values, expected_version=None, deleted=False)
        return await self.get(user_id, options=(joinedload(User.profile),), populate_existing=True)

    async def statistics(self, *, include_deleted: bool = False) -> UserStatistics:
        """Counts by role, status and provider from one GROUP BY over the three columns."""
        stmt = self.live(
            self.scoped(
                select(User.role, User.status, User.auth_provider, func.count()).group_by(
                    User.role, User.status, User.auth_provider
                )
            ),
            show_deleted=include_deleted,
        )
        by_role: dict[UserRole, int] = {}
        by_status: dict[UserStatus, int] = {}
        by_provider: dict[AuthProvider, int] = {}
        total = 0
        for role, status, provider, count in (await self.session.execute(stmt)).all():
            total += count
            by_role[role] = by_role.get(role, 0) + count
            by_status[status] = by_status.get(status, 0) + count
            by_provider[provider] = by_provider.get(provider, 0) + count
        return UserStatistics(
            total=total, by_role=by_role, by_status=by_status, by_auth_provider=by_provider
        )


_USER_RECORD: RecordRead[UserRecord] = RecordRead(
    select(*_RECORD_COLUMNS, *_PROFILE_COLUMNS).select_from(
        _USERS.outerjoin(_PROFILES, _PROFILES.c.user_id == _USERS.c.id)
    ),
    _USERS,
    record=_user_record,
    not_found=not_found_in(UsersRepository.resource_type, UsersRepository.collection),
)


async def read_user_record(
    reader: PointReader, user_id: uuid.UUID, *, show_deleted: bool = True
) -> UserRecord:
    """:meth:`UsersRepository.get_user_record` outside a session, for cache loaders: the
    same statement through :class:`~db.point_reads.PointReader` (no session, fewer round
    trips: see :mod:`db.point_reads`)."""
    return await _USER_RECORD.read(reader, user_id, show_deleted=show_deleted)
