"""The users area: organizations (tenants), users, their profiles and login sessions."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Index, String, func, text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.models.base import (
    AuditMixin,
    Base,
    EnumString,
    IdMixin,
    LongText,
    SoftDeleteMixin,
    TenantMixin,
    TimestampMixin,
    VersionMixin,
    check_in,
    utcnow,
)
from db.models.enums import AuthProvider, UserRole, UserStatus

_LIVE = text("delete_time IS NULL")


class Organization(IdMixin, TimestampMixin, AuditMixin, SoftDeleteMixin, VersionMixin, Base):
    """A tenant. Row-level security scopes this table by ``id`` rather than by a tenant column."""

    __tablename__ = "organizations"

    display_name: Mapped[str] = mapped_column(String(255))

    __table_args__ = (Index("ix_organizations_create_time_id", "create_time", "id"),)


class User(IdMixin, TenantMixin, TimestampMixin, AuditMixin, SoftDeleteMixin, VersionMixin, Base):
    __tablename__ = "users"

    #: Always lower-case (normalised by the repository, enforced by a CHECK).
    email: Mapped[str] = mapped_column(String(320))
    username: Mapped[str] = mapped_column(String(100))
    full_name: Mapped[str | None] = mapped_column(String(255))
    role: Mapped[UserRole] = mapped_column(EnumString(UserRole), default=UserRole.MEMBER)
    status: Mapped[UserStatus] = mapped_column(EnumString(UserStatus), default=UserStatus.ACTIVE)
    auth_provider: Mapped[AuthProvider] = mapped_column(
        EnumString(AuthProvider), default=AuthProvider.EMAIL
    )
    #: argon2id PHC string; required for EMAIL users, absent for federated ones.
    password_hash: Mapped[str | None] = mapped_column(String(255))
    last_login_time: Mapped[datetime | None] = mapped_column()

    profile: Mapped[UserProfile | None] = relationship(
        back_populates="user", lazy="raise", uselist=False, cascade="all, delete-orphan"
    )

    __table_args__ = (
        check_in("role", UserRole),
        check_in("status", UserStatus),
        check_in("auth_provider", AuthProvider),
        CheckConstraint(
            "auth_provider <> 'EMAIL' OR password_hash IS NOT NULL", name="password_required"
        ),
        CheckConstraint("email = lower(email)", name="email_lower_case"),
        Index(
            "uq_users_organization_id_email_live",
            "organization_id",
            "email",
            unique=True,
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        ),
        Index("ix_users_organization_id_create_time_id", "organization_id", "create_time", "id"),
        Index(
            "ix_users_live_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        ),
        Index("ix_users_organization_id_username", "organization_id", "username"),
    )


class UserProfile(TenantMixin, TimestampMixin, Base):
    """1:1 with users; changed through the user (whose version covers it)."""

    __tablename__ = "user_profiles"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    bio: Mapped[str | None] = mapped_column(LongText)
    avatar_uri: Mapped[str | None] = mapped_column(String(2048))
    locale: Mapped[str | None] = mapped_column(String(35))
    time_zone: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[User] = relationship(back_populates="profile", lazy="raise")


class UserSession(IdMixin, TenantMixin, Base):
    """A login session. The bearer token is never stored, only its SHA-256 digest."""

    __tablename__ = "user_sessions"

    user_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_agent: Mapped[str | None] = mapped_column(String(512))
    peer: Mapped[str | None] = mapped_column(String(255))
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )
    expire_time: Mapped[datetime] = mapped_column()
    revoke_time: Mapped[datetime | None] = mapped_column()
    #: Who revoked the session (the caller's ``sub`` claim).
    revoke_by: Mapped[str | None] = mapped_column(String(255))
    create_by: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        CheckConstraint("expire_time > create_time", name="expires_after_creation"),
        Index(
            "ix_user_sessions_organization_id_user_id_create_time_id",
            "organization_id",
            "user_id",
            "create_time",
            "id",
        ),
    )

    def is_active(self, now: datetime) -> bool:
        """Neither revoked nor past its expiry at ``now``."""
        return self.revoke_time is None and now < self.expire_time
