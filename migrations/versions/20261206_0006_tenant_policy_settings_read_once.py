"""Tenant policies read the tenant settings once per statement, not once per row (PostgreSQL).

``current_setting`` is only STABLE, so in a policy's predicate the planner calls it for
every row the policy filters (a count over an organization called it twice per row). A
scalar sub-select around each call makes it an InitPlan: evaluated once when the statement
runs (again at every execution of a cached plan, so a pooled connection that changes
tenant still gets the new setting), its result a parameter the per-row filter compares.

The semantics are those of 0001 exactly: an unset or empty ``ferrule.organization_id`` is
NULL, which equals no row, and only ``ferrule.all_organizations = 'on'`` opens every row.
Downgrade puts back 0001's predicate text.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 16:10:00
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The tables 0001 gave a ``tenant_isolation`` policy, with the column naming the tenant.
POLICY_KEYS = {
    "organizations": "id",
    "users": "organization_id",
    "user_profiles": "organization_id",
    "user_sessions": "organization_id",
    "analysis_batches": "organization_id",
    "text_analyses": "organization_id",
    "model_performance_records": "organization_id",
    "predictions": "organization_id",
    "ingest_batches": "organization_id",
    "idempotency_keys": "organization_id",
    "request_log": "organization_id",
}

_CURRENT_ORG = "nullif(current_setting('ferrule.organization_id', true), '')::uuid"
_ALL_ORGS = "current_setting('ferrule.all_organizations', true) = 'on'"


def per_row_predicate(key: str) -> str:
    """0001's predicate: the settings are read for every row."""
    return f"{key} = {_CURRENT_ORG} OR {_ALL_ORGS}"


def read_once_predicate(key: str) -> str:
    """The same predicate with each setting read by a scalar sub-select (an InitPlan)."""
    return f"{key} = (SELECT {_CURRENT_ORG}) OR (SELECT {_ALL_ORGS})"


def _alter_policies(predicate: Callable[[str], str]) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, key in POLICY_KEYS.items():
        # ALTER POLICY replaces both expressions in one catalog update, inside the
        # migration's transaction: no moment without a policy.
        op.execute(
            f"ALTER POLICY tenant_isolation ON {table} "
            f"USING ({predicate(key)}) WITH CHECK ({predicate(key)})"
        )


def upgrade() -> None:
    _alter_policies(read_once_predicate)


def downgrade() -> None:
    _alter_policies(per_row_predicate)
