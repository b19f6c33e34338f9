"""User login sessions. The bearer token is returned once at creation and stored only as
its SHA-256 digest, so a database leak does not leak usable tokens."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, or_, select, update

from db.errors import FieldViolation, ValidationError
from db.models import User, UserSession, utcnow
from db.pagination import JSONValue, Page, SortKey, paginate
from db.repositories.base import Repository, bounded, scope_to_tenant
from db.repositories.users import UsersRepository


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class CreatedSession:
    session: UserSession
    #: The bearer token; not recoverable later.
    token: str


class SessionsRepository(Repository[UserSession]):
    model = UserSession
    resource_type = "ferrule.v1.UserSession"
    collection = "sessions"

    def resource_name(self, resource_id: uuid.UUID | str) -> str:
        org = self.tenant.organization_id or "-"
        return f"organizations/{org}/users/-/sessions/{resource_id}"

    async def create(
        self,
        user_id: uuid.UUID,
        *,
        ttl: timedelta,
        user_agent: str | None = None,
        peer: str | None = None,
        create_by: str | None = None,
    ) -> CreatedSession:
        """A session for a live user of this tenant, valid for ``ttl``."""
        if ttl <= timedelta(0):
            raise ValidationError([FieldViolation("ttl", "must be positive")])
        # Foreign keys ignore row-level security, so the user's tenant is checked here.
        owner = scope_to_tenant(
            select(User.organization_id).where(User.id == user_id, User.delete_time.is_(None)),
            User.organization_id,
            self.tenant,
        )
        organization_id = (await self.session.execute(owner)).scalar_one_or_none()
        if organization_id is None:
            raise UsersRepository(self.session, self.tenant).not_found(user_id)
        token = secrets.token_urlsafe(32)
        now = utcnow()
        row = UserSession(
            organization_id=organization_id,
            user_id=user_id,
            token_sha256=hash_token(token),
            user_agent=user_agent,
            peer=peer,
            create_time=now,
            expire_time=now + ttl,
            create_by=create_by,
        )
        self.session.add(row)
        await self.session.flush()
        return CreatedSession(session=row, token=token)

    async def list(
        self,
        user_id: uuid.UUID | None = None,
        *,
        include_inactive: bool = False,
        now: datetime | None = None,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
    ) -> Page[UserSession]:
        """Sessions (of one user, or all), newest first; active ones unless asked otherwise."""
        stmt = self.select()
        if user_id is not None:
            stmt = stmt.where(UserSession.user_id == user_id)
        if not include_inactive:
            stmt = stmt.where(
                UserSession.revoke_time.is_(None), UserSession.expire_time > (now or utcnow())
            )
        keys = [SortKey(UserSession.create_time, True), SortKey(UserSession.id, True)]
        return await paginate(self.session, stmt, keys, page_size=page_size, cursor=cursor)

    async def revoke(
        self, session_id: uuid.UUID, *, now: datetime | None = None, revoke_by: str | None = None
    ) -> UserSession:
        """Revoke (idempotent: a revoked session keeps its first revoke time and revoker)."""
        stmt = (
            self.scoped(update(UserSession))
            .where(UserSession.id == session_id, UserSession.revoke_time.is_(None))
            .values(revoke_time=now or utcnow(), revoke_by=revoke_by)
            .execution_options(synchronize_session=False)
        )
        await self.session.execute(stmt)
        return await self.get(session_id, populate_existing=True)

    async def authenticate(self, token: str, *, now: datetime | None = None) -> UserSession | None:
        """The active session this token opens, or None (unknown, expired or revoked)."""
        stmt = self.select().where(UserSession.token_sha256 == hash_token(token))
        row = (await self.session.execute(stmt)).scalar_one_or_none()
        if row is None or not row.is_active(now or utcnow()):
            return None
        return row

    async def purge_inactive(self, *, before: datetime, limit: int = 1000) -> int:
        """Delete up to ``limit`` sessions expired or revoked before ``before``."""
        victims = (
            self.scoped(select(UserSession.id))
            .where(or_(UserSession.expire_time < before, UserSession.revoke_time < before))
            .limit(limit)
        )
        result = await self.session.execute(
            delete(UserSession)
            .where(UserSession.id.in_(bounded(victims).scalar_subquery()))
            .execution_options(synchronize_session=False)
        )
        return int(getattr(result, "rowcount", 0) or 0)
