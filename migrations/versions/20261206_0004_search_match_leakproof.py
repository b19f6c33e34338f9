"""Let SearchAnalyses use its GIN index under row-level security (PostgreSQL).

Under RLS the planner evaluates the policy before any condition whose functions are not
LEAKPROOF, so ``search_vector @@ tsquery`` (``ts_match_vq``) can only filter the rows the
policy lets through, never drive the GIN index. ``ts_match_vq`` compares a tsvector with
a tsquery and raises no error that depends on the row (only the query's shape, a cancel
or running out of memory can stop it), which is what LEAKPROOF promises: marking it lets
the index serve while the policy still filters every row (docs/search.md).

Only a superuser may mark a function LEAKPROOF. Run by any other role, this migration
changes nothing and logs the command for a superuser to run; the server warns at start
while the function is unmarked and ``DATABASE_APP_ROLE`` is set. The mark lives in this
database's catalog: ``pg_dump`` and ``pg_upgrade`` do not carry it, so it is run again
after a restore into a new cluster or a major upgrade.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 15:40:00
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

log = logging.getLogger("ferrule.migrations")

MATCH_FUNCTION = "pg_catalog.ts_match_vq(tsvector, tsquery)"
MARK = f"ALTER FUNCTION {MATCH_FUNCTION} LEAKPROOF"


def _superuser() -> bool:
    return bool(
        op.get_bind()
        .execute(sa.text("SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user"))
        .scalar()
    )


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    if _superuser():
        op.execute(MARK)
        return
    log.warning(
        "not a superuser: %s is left as it was, so under row-level security "
        "SearchAnalyses reads every row of the organization instead of its GIN index; "
        "a superuser runs, in this database: %s;",
        MATCH_FUNCTION,
        MARK,
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql" and _superuser():
        op.execute(f"ALTER FUNCTION {MATCH_FUNCTION} NOT LEAKPROOF")
