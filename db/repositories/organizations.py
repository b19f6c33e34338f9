"""Organizations (tenants). Creating one is an operator action (all-organizations tenant)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import InstrumentedAttribute

from db.errors import FieldViolation, NotFoundError, ValidationError
from db.models import Organization, utcnow
from db.pagination import JSONValue, Page, SortKey, paginate
from db.point_reads import PointReader
from db.repositories.base import RecordRead, Repository
from db.tenancy import Tenant

UPDATABLE_FIELDS = frozenset({"display_name"})


def organization_name(organization_id: uuid.UUID | str) -> str:
    """``organizations/{id}``: an organization's resource name (it has no parent)."""
    return f"organizations/{organization_id}"


@dataclass(frozen=True, slots=True)
class OrganizationRecord:
    """A read-only organization: the columns of :class:`Organization` under the same
    names, without ORM identity or instrumentation."""

    id: uuid.UUID
    display_name: str
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None
    create_by: str | None
    update_by: str | None
    delete_by: str | None
    version: int


def _check_display_name(display_name: str) -> str:
    display_name = display_name.strip()
    if not display_name or len(display_name) > 255:
        raise ValidationError([FieldViolation("display_name", "must be 1 to 255 characters")])
    return display_name


class OrganizationsRepository(Repository[Organization]):
    model = Organization
    resource_type = "ferrule.v1.Organization"
    collection = "organizations"

    def _organization_column(self) -> InstrumentedAttribute[Any]:
        return Organization.id  # an organization is its own tenant

    def resource_name(self, resource_id: uuid.UUID | str) -> str:
        return organization_name(resource_id)

    async def create(
        self,
        display_name: str,
        *,
        create_by: str | None = None,
        organization_id: uuid.UUID | None = None,
    ) -> Organization:
        organization = Organization(
            display_name=_check_display_name(display_name),
            create_by=create_by,
            update_by=create_by,
        )
        if organization_id is not None:
            organization.id = organization_id
        self.session.add(organization)
        await self.session.flush()
        return organization

    async def list(
        self,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        show_deleted: bool = False,
    ) -> Page[Organization]:
        keys = [SortKey(Organization.create_time), SortKey(Organization.id)]
        stmt = self.select(show_deleted=show_deleted)
        return await paginate(self.session, stmt, keys, page_size=page_size, cursor=cursor)

    async def update(
        self,
        organization_id: uuid.UUID,
        changes: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
    ) -> Organization:
        unknown = sorted(set(changes) - UPDATABLE_FIELDS)
        if unknown:
            raise ValidationError([FieldViolation(name, "cannot be updated") for name in unknown])
        values: dict[str, Any] = {"update_time": utcnow(), "update_by": update_by}
        if "display_name" in changes:
            values["display_name"] = _check_display_name(changes["display_name"])
        await self._versioned_update(
            organization_id, values, expected_version=expected_version, deleted=False
        )
        return await self.get(organization_id, populate_existing=True)


def _not_found(tenant: Tenant, organization_id: uuid.UUID) -> NotFoundError:
    return NotFoundError(OrganizationsRepository.resource_type, organization_name(organization_id))


# Scoped by ``id``, as OrganizationsRepository scopes every statement.
_ORGANIZATION_RECORD = RecordRead.of_columns(
    Organization.__table__, OrganizationRecord, not_found=_not_found, organization_column="id"
)


async def read_organization_record(
    reader: PointReader, organization_id: uuid.UUID, *, show_deleted: bool = True
) -> OrganizationRecord:
    """:meth:`OrganizationsRepository.get` for cache loaders: a prebuilt select through
    :class:`~db.point_reads.PointReader` into a plain record (:class:`RecordRead`)."""
    return await _ORGANIZATION_RECORD.read(reader, organization_id, show_deleted=show_deleted)
