"""Model names up to 200 characters (as the contract says); who revoked a session.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 05:35:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: (table, column, nullable) of the model-name columns widened from 100 to 200.
MODEL_NAME_COLUMNS = (
    ("text_analyses", "model_used", True),
    ("model_performance_records", "model_name", False),
    ("predictions", "model_name", False),
)


def _resize(length_from: int, length_to: int) -> None:
    for table, column, nullable in MODEL_NAME_COLUMNS:
        with op.batch_alter_table(table) as batch:
            batch.alter_column(
                column,
                existing_type=sa.String(length_from),
                type_=sa.String(length_to),
                existing_nullable=nullable,
            )


def upgrade() -> None:
    _resize(100, 200)
    with op.batch_alter_table("user_sessions") as batch:
        batch.add_column(sa.Column("revoke_by", sa.String(255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_sessions") as batch:
        batch.drop_column("revoke_by")
    # Values longer than 100 characters would not fit back: refuse rather than truncate.
    _resize(200, 100)
