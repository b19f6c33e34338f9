"""Who a transaction acts for: one organization, or every organization (operators only)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from db.errors import FieldViolation, ValidationError


@dataclass(frozen=True, slots=True)
class Tenant:
    """The tenant of one transaction.

    Repositories scope every query with it, and on PostgreSQL the transaction helper
    copies it into ``ferrule.organization_id`` / ``ferrule.all_organizations`` for the
    row-level security policies. A tenant with neither an organization nor
    ``all_organizations`` sees nothing.
    """

    organization_id: uuid.UUID | None
    all_organizations: bool = False

    @classmethod
    def of(cls, organization_id: uuid.UUID) -> Tenant:
        return cls(organization_id=organization_id)

    @classmethod
    def all(cls) -> Tenant:
        """The operator view across every organization (admin token or ``org: "*"``)."""
        return cls(organization_id=None, all_organizations=True)

    def require_organization(self) -> uuid.UUID:
        """The organization a new row belongs to; an all-organizations tenant must name one."""
        if self.organization_id is None:
            raise ValidationError(
                [FieldViolation("parent", "name the organization the resource belongs to")]
            )
        return self.organization_id
