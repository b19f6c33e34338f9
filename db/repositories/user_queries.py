"""Queries the UserService contract needs beyond the base users-area repositories.

Subclasses of the organizations / users / sessions repositories (same tenant scoping,
same models): ordered organization listing with totals, email-ordered search, optional
usernames, user-scoped session reads, caller-chosen session ids and revoking every
session of a user. Kept apart so the base repositories stay the data layer's own.
"""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy import func, or_, update
from sqlalchemy.orm import joinedload

from db.errors import FieldViolation, NotFoundError, ValidationError
from db.models import (
    AuthProvider,
    Organization,
    User,
    UserRole,
    UserSession,
    UserStatus,
    utcnow,
)
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.repositories.base import domain_errors
from db.repositories.organizations import OrganizationsRepository
from db.repositories.sessions import CreatedSession, SessionsRepository, hash_token
from db.repositories.users import ProfileFields, UsersRepository, normalize_email

_ORGANIZATION_ORDER = {
    "create_time": Organization.create_time,
    "display_name": Organization.display_name,
}
_SESSION_ORDER = {
    "create_time": UserSession.create_time,
    "expire_time": UserSession.expire_time,
}
#: Stored for a user created without a username: the column is NOT NULL, the field optional.
NO_USERNAME = ""
_PLACEHOLDER_USERNAME = "-"


class OrganizationQueries(OrganizationsRepository):
    async def list_ordered(
        self,
        *,
        order_by: str,
        page_size: int,
        cursor: Sequence[JSONValue] | None,
        show_deleted: bool,
    ) -> Page[Organization]:
        """A keyset page in ``order_by`` (default newest first), with the total count."""
        keys = parse_order_by(
            order_by,
            _ORGANIZATION_ORDER,
            default=(SortKey(Organization.create_time, descending=True),),
            tiebreaker=Organization.id,
        )
        stmt = self.select(show_deleted=show_deleted)
        return await paginate(
            self.session, stmt, keys, page_size=page_size, cursor=cursor, include_total=True
        )


class UserQueries(UsersRepository):
    async def create_user(
        self,
        *,
        email: str,
        username: str,
        full_name: str | None,
        role: UserRole,
        status: UserStatus,
        auth_provider: AuthProvider,
        password: str | None,
        profile: ProfileFields,
        create_by: str | None,
        user_id: uuid.UUID | None,
    ) -> User:
        """``UsersRepository.create`` that also accepts an empty (absent) username."""
        user = await self.create(
            email=email,
            username=username or _PLACEHOLDER_USERNAME,
            full_name=full_name,
            role=role,
            status=status,
            auth_provider=auth_provider,
            password=password,
            profile=profile,
            create_by=create_by,
            user_id=user_id,
        )
        if not username:
            # Same transaction, so nobody sees the placeholder.
            user.username = NO_USERNAME
            user.update_time = user.create_time
            await self.session.flush()
        return user

    async def find_by_email(self, email: str) -> User | None:
        """The live user with this email (any case), or None."""
        stmt = (
            self.select()
            .options(joinedload(User.profile))
            .where(User.email == normalize_email(email))
        )
        user: User | None = (await self.session.execute(stmt)).unique().scalar_one_or_none()
        return user

    async def search_by_email(
        self, query: str, *, page_size: int, cursor: Sequence[JSONValue] | None
    ) -> Page[User]:
        """Live users whose email or username contains ``query`` (literal, any case),
        ordered by email."""
        needle = query.strip().lower()
        if not needle:
            raise ValidationError([FieldViolation("query", "must not be empty")])
        stmt = (
            self.select()
            .options(joinedload(User.profile))
            .where(
                or_(
                    User.email.contains(needle, autoescape=True),
                    func.lower(User.username).contains(needle, autoescape=True),
                )
            )
        )
        keys = [SortKey(User.email), SortKey(User.id)]
        return await paginate(self.session, stmt, keys, page_size=page_size, cursor=cursor)


class SessionQueries(SessionsRepository):
    def session_name(self, user_id: uuid.UUID, session_id: uuid.UUID) -> str:
        org = self.tenant.organization_id or "-"
        return f"organizations/{org}/users/{user_id}/sessions/{session_id}"

    async def open(
        self,
        user_id: uuid.UUID,
        *,
        expire_time: datetime,
        now: datetime,
        session_id: uuid.UUID | None = None,
        user_agent: str | None = None,
        peer: str | None = None,
        create_by: str | None = None,
    ) -> CreatedSession:
        """A session for a user the caller has already checked (live, ACTIVE, this tenant),
        with an optional caller-chosen id (AlreadyExistsError when taken)."""
        organization_id = self.tenant.require_organization()
        token = secrets.token_urlsafe(32)
        row = UserSession(
            organization_id=organization_id,
            user_id=user_id,
            token_sha256=hash_token(token),
            user_agent=user_agent,
            peer=peer,
            create_time=now,
            expire_time=expire_time,
            create_by=create_by,
        )
        if session_id is not None:
            row.id = session_id
        self.session.add(row)
        name = self.session_name(user_id, session_id or row.id)
        async with domain_errors(self.resource_type, name):
            await self.session.flush()
        return CreatedSession(session=row, token=token)

    async def get_for_user(self, user_id: uuid.UUID, session_id: uuid.UUID) -> UserSession:
        """The session, if it belongs to this user; NotFoundError naming the full name."""
        stmt = self.select().where(UserSession.id == session_id, UserSession.user_id == user_id)
        row: UserSession | None = (await self.session.execute(stmt)).scalar_one_or_none()
        if row is None:
            raise NotFoundError(self.resource_type, self.session_name(user_id, session_id))
        return row

    async def list_for_user(
        self,
        user_id: uuid.UUID,
        *,
        order_by: str,
        include_inactive: bool,
        now: datetime,
        page_size: int,
        cursor: Sequence[JSONValue] | None,
    ) -> Page[UserSession]:
        """A keyset page of one user's sessions (default newest first), with the total."""
        stmt = self.select().where(UserSession.user_id == user_id)
        if not include_inactive:
            stmt = stmt.where(UserSession.revoke_time.is_(None), UserSession.expire_time > now)
        keys = parse_order_by(
            order_by,
            _SESSION_ORDER,
            default=(SortKey(UserSession.create_time, descending=True),),
            tiebreaker=UserSession.id,
        )
        return await paginate(
            self.session, stmt, keys, page_size=page_size, cursor=cursor, include_total=True
        )

    async def revoke_for_user(
        self,
        user_id: uuid.UUID,
        session_id: uuid.UUID,
        *,
        now: datetime,
        revoke_by: str | None = None,
    ) -> UserSession:
        """Revoke one session of this user; a revoked one keeps its first revoke time."""
        await self.get_for_user(user_id, session_id)
        return await self.revoke(session_id, now=now, revoke_by=revoke_by)

    async def revoke_all_for_user(
        self, user_id: uuid.UUID, *, now: datetime | None = None, revoke_by: str | None = None
    ) -> int:
        """Revoke every active session of the user (on delete); returns how many."""
        stmt = (
            self.scoped(update(UserSession))
            .where(
                UserSession.user_id == user_id,
                UserSession.revoke_time.is_(None),
                UserSession.expire_time > (now or utcnow()),
            )
            .values(revoke_time=now or utcnow(), revoke_by=revoke_by)
            .execution_options(synchronize_session=False)
        )
        result = await self.session.execute(stmt)
        return int(getattr(result, "rowcount", 0) or 0)
