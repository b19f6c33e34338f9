"""Declarative base, portable column types and the mixins every table is built from.

The same models run on PostgreSQL (UUID, JSONB, timestamptz), MySQL/MariaDB (native
``uuid`` on MariaDB, ``CHAR(32)`` on MySQL, JSON, ``DATETIME(6)`` in UTC) and SQLite, so
the types here pick the native type per dialect and normalise what comes back (aware UTC
datetimes, enum members) so repositories never care which backend they talk to.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import uuid_utils.compat
from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
    func,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column
from sqlalchemy.types import TypeEngine

#: Every constraint and index gets a deterministic name, so migrations can refer to
#: them and ``alembic check`` compares like with like on both backends.
NAMING_CONVENTION: dict[str, str] = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: JSON documents: JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")
#: Unbounded text and bytes: TEXT and BLOB stop at 64 KiB on MySQL/MariaDB.
LongText = Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
LongBinary = LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

#: Dialects of the MySQL family (``mysql+asyncmy://`` and ``mariadb+asyncmy://``).
MYSQL_DIALECTS = frozenset({"mysql", "mariadb"})


def new_id() -> uuid.UUID:
    """A time-ordered UUIDv7: inserts land at the right edge of the primary-key B-tree."""
    return uuid_utils.compat.uuid7()


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamptz`` on PostgreSQL; on SQLite and MySQL/MariaDB (no zones) stored as UTC
    (``DATETIME(6)`` there, microseconds kept), read back aware."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name in MYSQL_DIALECTS:
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(self.impl)

    @property
    def python_type(self) -> type[datetime]:
        return datetime

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass an aware datetime")
        value = value.astimezone(UTC)
        # SQLite compares the stored text, so every value must share one format; MySQL's
        # DATETIME has no zone (the connection's time zone is UTC).
        zoneless = dialect.name == "sqlite" or dialect.name in MYSQL_DIALECTS
        return value.replace(tzinfo=None) if zoneless else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


E = TypeVar("E", bound=enum.StrEnum)


class EnumString(TypeDecorator[E], Generic[E]):
    """A StrEnum stored as its short upper-case value in a VARCHAR (no native PG enum).

    The allowed values are enforced by a named CHECK constraint (see :func:`check_in`),
    which keeps the schema portable and adding a value a plain migration.
    """

    impl = String(32)
    cache_ok = True

    def __init__(self, enum_type: type[E]) -> None:
        super().__init__()
        self.enum_type = enum_type
        # Every enum column of every row read passes through process_result_value: a
        # dict lookup by stored value is much cheaper than calling the enum class.
        self._members: dict[str, E] = {member.value: member for member in enum_type}

    @property
    def python_type(self) -> type[E]:
        return self.enum_type

    def process_bind_param(self, value: E | str | None, dialect: Dialect) -> str | None:
        if value is None:
            return None
        return self.enum_type(value).value

    def process_result_value(self, value: str | None, dialect: Dialect) -> E | None:
        if value is None:
            return None
        member = self._members.get(value)
        # Anything else goes to the enum itself, which refuses it as it always did.
        return member if member is not None else self.enum_type(value)


def check_in(
    column: str, enum_type: type[enum.StrEnum], name: str | None = None
) -> CheckConstraint:
    """Named CHECK constraint limiting ``column`` to the values of ``enum_type``."""
    allowed = ", ".join(f"'{member.value}'" for member in enum_type)
    return CheckConstraint(f"{column} IN ({allowed})", name=name or column)


def check_between(column: str, low: float, high: float, name: str | None = None) -> CheckConstraint:
    """Named CHECK constraint ``low <= column <= high`` (NULL passes, as in SQL)."""
    return CheckConstraint(f"{column} >= {low} AND {column} <= {high}", name=name or column)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        datetime: UTCDateTime(),
        uuid.UUID: Uuid(),
        dict[str, Any]: JSONType,
    }


class IdMixin:
    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=new_id, sort_order=-10)


class TimestampMixin:
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )
    update_time: Mapped[datetime] = mapped_column(
        default=utcnow, onupdate=utcnow, server_default=func.current_timestamp()
    )


class AuditMixin:
    """Who created / last changed / deleted the row (the caller's ``sub`` claim)."""

    create_by: Mapped[str | None] = mapped_column(String(255))
    update_by: Mapped[str | None] = mapped_column(String(255))
    delete_by: Mapped[str | None] = mapped_column(String(255))


class SoftDeleteMixin:
    """AIP-164 soft delete: a row with ``delete_time`` set is hidden unless asked for."""

    delete_time: Mapped[datetime | None] = mapped_column()

    @property
    def is_deleted(self) -> bool:
        return self.delete_time is not None


class TenantMixin:
    """Owned by one organization; row-level security on PostgreSQL keys off this column."""

    @declared_attr
    def organization_id(cls) -> Mapped[uuid.UUID]:
        return mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"), sort_order=-9)


class VersionMixin:
    """Optimistic concurrency: bumped by every write, encoded into the resource's etag."""

    version: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
