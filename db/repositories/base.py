"""What every repository shares: tenant scoping, live-row filtering, get-or-raise, the
versioned update / soft delete / undelete of AIP-134/135/164, and the same Get as a point
read into a plain record (:class:`RecordRead`, for cache loaders).

Tenant scoping lives here and only here: :func:`scope_to_tenant` is applied to every
statement a repository builds. Row-level security on PostgreSQL enforces the same rule
a second time, so a forgotten call fails closed there.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import Delete, FromClause, Select, Update, bindparam, delete, false, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.sql.base import ExecutableOption

from db.error_translation import translate_error
from db.errors import (
    AlreadyExistsError,
    DomainError,
    NotFoundError,
    StaleEtagError,
)
from db.models.base import Base, utcnow
from db.point_reads import PointRead, PointReader
from db.tenancy import Tenant

M = TypeVar("M", bound=Base)
S = TypeVar("S", bound=Select[*tuple[Any, ...]] | Update | Delete)
R = TypeVar("R")


def scope_to_tenant(stmt: S, organization_column: InstrumentedAttribute[Any], tenant: Tenant) -> S:
    """Restrict ``stmt`` to ``tenant``'s rows (no-op for the all-organizations tenant).

    A tenant with neither an organization nor ``all_organizations`` matches nothing.
    """
    if tenant.all_organizations:
        return stmt
    if tenant.organization_id is None:
        return cast(S, stmt.where(false()))
    return cast(S, stmt.where(organization_column == tenant.organization_id))


def bounded(victims: Select[*tuple[Any, ...]]) -> Select[*tuple[Any, ...]]:
    """``victims`` (a select with its LIMIT) wrapped in a derived table, for ``IN (...)``.

    MySQL/MariaDB refuse a LIMIT inside an IN subquery, and a subquery reading the table
    a DELETE writes, but accept both inside a derived table; so do the other backends.
    """
    derived = victims.subquery("victims")
    return select(*derived.c)


async def matched_one(session: AsyncSession, stmt: Update | Delete) -> bool:
    """Run a single-row UPDATE or DELETE; True when it matched its row.

    RETURNING where the backend has it for the statement; MySQL (and MariaDB for UPDATE)
    has not, and there the driver's matched-row count answers (asyncmy connects with
    CLIENT_FOUND_ROWS, so a row updated to identical values still counts).
    """
    dialect = session.get_bind().dialect
    returning = dialect.update_returning if isinstance(stmt, Update) else dialect.delete_returning
    table = cast(FromClause, stmt.table)
    key = next(iter(table.primary_key))
    options = {"synchronize_session": False}
    if returning:
        found = await session.execute(stmt.returning(key).execution_options(**options))
        return found.scalar_one_or_none() is not None
    result = await session.execute(stmt.execution_options(**options))
    return int(getattr(result, "rowcount", 0) or 0) > 0


@asynccontextmanager
async def domain_errors(
    resource_type: str, resource_name: str, *, conflict_message: str | None = None
) -> AsyncIterator[None]:
    """Translate driver errors raised in the block, naming the resource a conflict is about."""
    try:
        yield
    except sa_exc.SQLAlchemyError as exc:
        mapped = translate_error(exc)
        if isinstance(mapped, AlreadyExistsError):
            raise AlreadyExistsError(resource_type, resource_name, conflict_message) from exc
        if mapped is not None:
            raise mapped from exc
        raise


def resource_name(tenant: Tenant, collection: str, resource_id: uuid.UUID | str) -> str:
    """``organizations/{org}/{collection}/{id}`` (``-`` for the organization when unknown)."""
    return f"organizations/{tenant.organization_id or '-'}/{collection}/{resource_id}"


class RecordRead(Generic[R]):
    """A repository's Get by id into a plain record, as prebuilt selects.

    For reads that only convert the row (cache loaders): no ORM identity map, loading or
    instrumentation, and through :class:`~db.point_reads.PointReader` no session either
    (fewer round trips, see :mod:`db.point_reads`). One Core select per tenant
    scope and ``show_deleted``, built once (so each is compiled once per dialect, and a
    session executing one again skips building and compiling it), scoped exactly as
    :meth:`Repository.get` scopes its statement: :func:`scope_to_tenant` on
    ``organization_column`` (the organization as a parameter), :meth:`Repository.live`
    on ``delete_time`` when the table has one. Absence is ``not_found(tenant, id)``.

    ``stmt`` selects the record's columns (in ``record``'s order) from ``table`` and
    whatever it joins; the id, organization and deletion columns are ``table``'s.
    """

    __slots__ = ("_not_found", "_reads", "_record")

    def __init__(
        self,
        stmt: Select[Any],
        table: FromClause,
        *,
        record: Callable[[Sequence[Any]], R],
        not_found: Callable[[Tenant, uuid.UUID], NotFoundError],
        organization_column: str = "organization_id",
    ) -> None:
        self._record = record
        self._not_found = not_found
        stmt = stmt.where(table.c.id == bindparam("id"))
        delete_time = table.c.get("delete_time")
        self._reads: dict[tuple[str, bool], PointRead] = {}
        for show_deleted in (False, True):
            live = stmt
            if not show_deleted and delete_time is not None:
                live = live.where(delete_time.is_(None))
            self._reads["all", show_deleted] = PointRead(live)
            self._reads["organization", show_deleted] = PointRead(
                live.where(table.c[organization_column] == bindparam("organization_id"))
            )
            self._reads["none", show_deleted] = PointRead(live.where(false()))

    @classmethod
    def of_columns(
        cls,
        table: FromClause,
        record: type[R],
        *,
        not_found: Callable[[Tenant, uuid.UUID], NotFoundError],
        organization_column: str = "organization_id",
    ) -> RecordRead[R]:
        """``record`` a dataclass whose fields are all columns of ``table``, by name."""
        columns = record_columns(table, record)
        build = cast("Callable[..., R]", record)
        return cls(
            select(*columns),
            table,
            record=lambda row: build(*row),
            not_found=not_found,
            organization_column=organization_column,
        )

    def choose(
        self, tenant: Tenant, resource_id: uuid.UUID, *, show_deleted: bool
    ) -> tuple[PointRead, dict[str, Any]]:
        """The select for ``tenant``'s scope and its parameters."""
        params: dict[str, Any] = {"id": resource_id}
        if tenant.all_organizations:
            scope = "all"
        elif tenant.organization_id is None:
            scope = "none"
        else:
            scope = "organization"
            params["organization_id"] = tenant.organization_id
        return self._reads[scope, show_deleted], params

    def _found(self, row: Sequence[Any] | None, tenant: Tenant, resource_id: uuid.UUID) -> R:
        if row is None:
            raise self._not_found(tenant, resource_id)
        return self._record(row)

    async def read(
        self, reader: PointReader, resource_id: uuid.UUID, *, show_deleted: bool = True
    ) -> R:
        """The record through ``reader`` (its tenant), or NotFoundError."""
        read, params = self.choose(reader.tenant, resource_id, show_deleted=show_deleted)
        return self._found(await reader.fetch_row(read, params), reader.tenant, resource_id)

    async def read_in(
        self,
        session: AsyncSession,
        tenant: Tenant,
        resource_id: uuid.UUID,
        *,
        show_deleted: bool = True,
    ) -> R:
        """The same select on a session's connection (in its transaction)."""
        read, params = self.choose(tenant, resource_id, show_deleted=show_deleted)
        connection = await session.connection()
        row = (await connection.execute(read.statement, params)).first()
        return self._found(row, tenant, resource_id)


def not_found_in(
    resource_type: str, collection: str
) -> Callable[[Tenant, uuid.UUID], NotFoundError]:
    """``not_found`` for a :class:`RecordRead`: what :meth:`Repository.not_found` raises
    (for a repository that keeps the default :meth:`Repository.resource_name`)."""

    def not_found(tenant: Tenant, resource_id: uuid.UUID) -> NotFoundError:
        return NotFoundError(resource_type, resource_name(tenant, collection, resource_id))

    return not_found


def record_columns(table: FromClause, record: type[Any], *, skip: int = 0) -> tuple[Any, ...]:
    """``table``'s columns named as the fields of the dataclass ``record`` (after the first
    ``skip``), in field order."""
    return tuple(table.c[field.name] for field in dataclasses.fields(record)[skip:])


class Repository(Generic[M]):
    """Base of a repository over one tenant-owned model.

    Subclasses set ``model``, ``resource_type`` (the full name of the resource's protobuf
    message, for errors) and ``collection`` (the resource-name segment, e.g. ``users``),
    and ``load_options`` when a row is returned with related rows (a user's profile).
    """

    model: ClassVar[type[Any]]
    resource_type: ClassVar[str]
    collection: ClassVar[str]
    load_options: ClassVar[tuple[ExecutableOption, ...]] = ()

    def __init__(self, session: AsyncSession, tenant: Tenant) -> None:
        self.session = session
        self.tenant = tenant

    # --- statement building -----------------------------------------------------
    @property
    def _model(self) -> type[M]:
        return cast("type[M]", self.model)

    def _organization_column(self) -> InstrumentedAttribute[Any]:
        return cast("InstrumentedAttribute[Any]", self.model.organization_id)

    def scoped(self, stmt: S) -> S:
        """Scope a statement over *this repository's model*; for other tables use
        :func:`scope_to_tenant` with their own ``organization_id`` column."""
        return scope_to_tenant(stmt, self._organization_column(), self.tenant)

    def live(self, stmt: S, *, show_deleted: bool = False) -> S:
        """Hide soft-deleted rows unless ``show_deleted`` (models without delete_time: no-op)."""
        if show_deleted or not hasattr(self.model, "delete_time"):
            return stmt
        return cast(S, stmt.where(self.model.delete_time.is_(None)))

    def select(self, *, show_deleted: bool = False) -> Select[M]:
        """``SELECT model`` scoped to the tenant, live rows only unless ``show_deleted``."""
        return self.live(self.scoped(select(self._model)), show_deleted=show_deleted)

    def resource_name(self, resource_id: uuid.UUID | str) -> str:
        return resource_name(self.tenant, self.collection, resource_id)

    def not_found(self, resource_id: uuid.UUID | str) -> NotFoundError:
        return NotFoundError(self.resource_type, self.resource_name(resource_id))

    # --- reads --------------------------------------------------------------------
    async def get(
        self,
        resource_id: uuid.UUID,
        *,
        show_deleted: bool = True,
        options: Sequence[ExecutableOption] = (),
        populate_existing: bool = False,
    ) -> M:
        """The row with ``resource_id`` in this tenant, or NotFoundError. One statement.

        Soft-deleted rows are returned by default (AIP-164: Get still answers for them).
        """
        stmt = self.select(show_deleted=show_deleted).where(self.model.id == resource_id)
        if options:
            stmt = stmt.options(*options)
        if populate_existing:
            stmt = stmt.execution_options(populate_existing=True)
        row = (await self.session.execute(stmt)).unique().scalar_one_or_none()
        if row is None:
            raise self.not_found(resource_id)
        return row

    # --- versioned writes (models with VersionMixin + SoftDeleteMixin) -------------
    async def _versioned_update(
        self,
        resource_id: uuid.UUID,
        values: Mapping[str, Any],
        *,
        expected_version: int | None,
        deleted: bool,
        conflict_message: str | None = None,
    ) -> None:
        """One UPDATE of a row in state ``deleted`` at ``expected_version``; bumps the version.

        When no row matched, a second look tells NotFound (absent, or not in the expected
        deleted/live state) from StaleEtag (present with another version).
        """
        model = self.model
        stmt = self.scoped(update(model)).where(model.id == resource_id)
        if hasattr(model, "delete_time"):
            condition = model.delete_time.is_not(None) if deleted else model.delete_time.is_(None)
            stmt = stmt.where(condition)
        if expected_version is not None:
            stmt = stmt.where(model.version == expected_version)
        stmt = stmt.values(**values, version=model.version + 1)
        async with domain_errors(
            self.resource_type, self.resource_name(resource_id), conflict_message=conflict_message
        ):
            updated = await matched_one(self.session, stmt)
        if updated:
            return
        current = await self.get(resource_id, show_deleted=True)
        if getattr(current, "delete_time", None) is not None and not deleted:
            raise self.not_found(resource_id)
        if deleted and getattr(current, "delete_time", None) is None:
            raise AlreadyExistsError(
                self.resource_type, self.resource_name(resource_id), "the resource is not deleted"
            )
        if expected_version is not None and getattr(current, "version", None) != expected_version:
            raise StaleEtagError(self.resource_name(resource_id))
        raise DomainError(f"update of {self.resource_name(resource_id)} matched no row")

    async def soft_delete(
        self,
        resource_id: uuid.UUID,
        *,
        expected_version: int | None = None,
        delete_by: str | None = None,
    ) -> M:
        """Mark deleted (AIP-164). Deleting a deleted or absent row is NotFoundError."""
        now = utcnow()
        values: dict[str, Any] = {"delete_time": now, "delete_by": delete_by, "update_time": now}
        await self._versioned_update(
            resource_id, values, expected_version=expected_version, deleted=False
        )
        return await self.get(resource_id, options=self.load_options, populate_existing=True)

    async def undelete(
        self,
        resource_id: uuid.UUID,
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
    ) -> M:
        """Restore a soft-deleted row; AlreadyExistsError when it is live or a unique key
        it held was taken meanwhile."""
        values: dict[str, Any] = {"delete_time": None, "delete_by": None, "update_time": utcnow()}
        if update_by is not None:
            values["update_by"] = update_by
        await self._versioned_update(
            resource_id,
            values,
            expected_version=expected_version,
            deleted=True,
            conflict_message="a live resource now holds one of its unique keys",
        )
        return await self.get(resource_id, options=self.load_options, populate_existing=True)

    async def purge(self, resource_id: uuid.UUID) -> None:
        """Delete the row for good (cascades to its dependants)."""
        stmt = self.scoped(delete(self.model)).where(self.model.id == resource_id)
        if not await matched_one(self.session, stmt):
            raise self.not_found(resource_id)
