"""Organizations (tenants). Creating one is an operator action (all-organizations tenant)."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.orm import InstrumentedAttribute

from db.errors import FieldViolation, ValidationError
from db.models import Organization, utcnow
from db.pagination import JSONValue, Page, SortKey, paginate
from db.repositories.base import Repository

UPDATABLE_FIELDS = frozenset({"display_name"})


def _check_display_name(display_name: str) -> str:
    display_name = display_name.strip()
    if not display_name or len(display_name) > 255:
        raise ValidationError([FieldViolation("display_name", "must be 1 to 255 characters")])
    return display_name


class OrganizationsRepository(Repository[Organization]):
    model = Organization
    resource_type = "Organization"
    collection = "organizations"

    def _organization_column(self) -> InstrumentedAttribute[Any]:
        return Organization.id  # an organization is its own tenant

    def resource_name(self, resource_id: uuid.UUID | str) -> str:
        return f"organizations/{resource_id}"

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
