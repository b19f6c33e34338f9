"""What every repository shares: tenant scoping, live-row filtering, get-or-raise, and the
versioned update / soft delete / undelete of AIP-134/135/164.

Tenant scoping lives here and only here: :func:`scope_to_tenant` is applied to every
statement a repository builds. Row-level security on PostgreSQL enforces the same rule
a second time, so a forgotten call fails closed there.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Generic, TypeVar, cast

from sqlalchemy import Delete, Select, Update, delete, false, select, update
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
from db.tenancy import Tenant

M = TypeVar("M", bound=Base)
S = TypeVar("S", bound=Select[*tuple[Any, ...]] | Update | Delete)


def scope_to_tenant(stmt: S, organization_column: InstrumentedAttribute[Any], tenant: Tenant) -> S:
    """Restrict ``stmt`` to ``tenant``'s rows (no-op for the all-organizations tenant).

    A tenant with neither an organization nor ``all_organizations`` matches nothing.
    """
    if tenant.all_organizations:
        return stmt
    if tenant.organization_id is None:
        return cast(S, stmt.where(false()))
    return cast(S, stmt.where(organization_column == tenant.organization_id))


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


class Repository(Generic[M]):
    """Base of a repository over one tenant-owned model.

    Subclasses set ``model``, ``resource_type`` (for errors) and ``collection`` (the
    resource-name segment, e.g. ``users``).
    """

    model: ClassVar[type[Any]]
    resource_type: ClassVar[str]
    collection: ClassVar[str]

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
        stmt = (
            stmt.values(**values, version=model.version + 1)
            .returning(model.id)
            .execution_options(synchronize_session=False)
        )
        async with domain_errors(
            self.resource_type, self.resource_name(resource_id), conflict_message=conflict_message
        ):
            updated = (await self.session.execute(stmt)).scalar_one_or_none()
        if updated is not None:
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
        options: Sequence[ExecutableOption] = (),
    ) -> M:
        """Mark deleted (AIP-164). Deleting a deleted or absent row is NotFoundError."""
        now = utcnow()
        values: dict[str, Any] = {"delete_time": now, "delete_by": delete_by, "update_time": now}
        await self._versioned_update(
            resource_id, values, expected_version=expected_version, deleted=False
        )
        return await self.get(resource_id, options=options, populate_existing=True)

    async def undelete(
        self,
        resource_id: uuid.UUID,
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
        options: Sequence[ExecutableOption] = (),
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
        return await self.get(resource_id, options=options, populate_existing=True)

    async def purge(self, resource_id: uuid.UUID) -> None:
        """Delete the row for good (cascades to its dependants)."""
        stmt = self.scoped(delete(self.model)).where(self.model.id == resource_id)
        result = await self.session.execute(
            stmt.returning(self.model.id).execution_options(synchronize_session=False)
        )
        if result.scalar_one_or_none() is None:
            raise self.not_found(resource_id)
