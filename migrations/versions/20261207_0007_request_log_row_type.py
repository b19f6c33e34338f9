"""The request log's batch row as a composite type, ``request_log_row`` (PostgreSQL).

The writer sent a batch as one array per column (eleven arrays). asyncpg checks every
element of every array for being a nested array before encoding it, which made encoding
the larger part of the writer's CPU in the server process, and the server writes one
row per RPC. An array of this type is one parameter whose elements are encoded as
records, without those checks (db/repositories/request_log.py).

The attributes are the writer's columns in the order it sends them. A column added to
the request log that the writer fills needs an attribute here too (a later revision's
``ALTER TYPE ... ADD ATTRIBUTE``); tests/db/test_request_log_row_type.py compares the
two. Other backends keep their executemany and get nothing.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 03:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TYPE = "request_log_row"
# Text, not the columns' VARCHAR(n): a cast to VARCHAR(n) would cut silently, and the
# writer cuts over-long values itself, alike on every backend.
ATTRIBUTES = (
    ("id", "uuid"),
    ("method", "text"),
    ("caller", "text"),
    ("organization_id", "uuid"),
    ("peer", "text"),
    ("user_agent", "text"),
    ("status_code", "text"),
    ("latency_ms", "double precision"),
    ("request_bytes", "integer"),
    ("trace_id", "text"),
    ("create_time", "timestamp with time zone"),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    attributes = ", ".join(f"{name} {kind}" for name, kind in ATTRIBUTES)
    op.execute(f"CREATE TYPE {TYPE} AS ({attributes})")


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"DROP TYPE {TYPE}")
