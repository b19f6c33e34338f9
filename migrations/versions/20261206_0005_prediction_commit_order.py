"""WatchPredictions' commit order: ``predictions.commit_seq`` and its index.

A tail resumable from a cursor needs an order in which a row can never appear *behind*
a position already delivered, i.e. commit order. Ids and insert order are not: a
transaction that wrote a lower value may commit after one that wrote a higher one.

PostgreSQL: ``commit_seq`` defaults to the writing transaction's id
(``pg_current_xact_id()``, 64 bits, never wraps). A reader delivers only rows whose id is
below its snapshot's ``xmin``: every transaction below it has ended, so no row can still
commit there. No lock, no trigger; a long transaction only delays delivery. The column is
added without a default and the default set afterwards, so existing rows stay NULL
instead of the whole table being rewritten.
SQLite and MariaDB/MySQL: a trigger takes the next value of a per-organization counter
(``prediction_sequences``) for every inserted row. The counter row stays locked until the
writing transaction ends, so the values of one organization are handed out in commit
order (SQLite serializes writers anyway). A batch operation that re-creates
``predictions`` on SQLite must re-create the trigger.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 15:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLE = "prediction_sequences"
INDEX = "ix_predictions_organization_id_commit_seq_id"
TRIGGER = "predictions_commit_seq"

SQLITE_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} AFTER INSERT ON predictions BEGIN
  INSERT OR IGNORE INTO {TABLE} (organization_id, last_seq) VALUES (NEW.organization_id, 0);
  UPDATE {TABLE} SET last_seq = last_seq + 1 WHERE organization_id = NEW.organization_id;
  UPDATE predictions SET commit_seq = (
    SELECT last_seq FROM {TABLE} WHERE organization_id = NEW.organization_id
  ) WHERE rowid = NEW.rowid;
END
"""

MYSQL_TRIGGER = f"""
CREATE TRIGGER {TRIGGER} BEFORE INSERT ON predictions FOR EACH ROW
BEGIN
  INSERT INTO {TABLE} (organization_id, last_seq) VALUES (NEW.organization_id, 1)
    ON DUPLICATE KEY UPDATE last_seq = last_seq + 1;
  SET NEW.commit_seq = (SELECT last_seq FROM {TABLE} WHERE organization_id = NEW.organization_id);
END
"""


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    op.add_column("predictions", sa.Column("commit_seq", sa.BigInteger(), nullable=True))
    op.create_index(INDEX, "predictions", ["organization_id", "commit_seq", "id"])
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE predictions ALTER COLUMN commit_seq "
            "SET DEFAULT (pg_current_xact_id()::text::bigint)"
        )
        return
    op.create_table(
        TABLE,
        sa.Column("organization_id", sa.Uuid(), primary_key=True),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
    )
    op.execute(SQLITE_TRIGGER if dialect == "sqlite" else MYSQL_TRIGGER)


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect != "postgresql":
        op.execute(f"DROP TRIGGER {TRIGGER}")
        op.drop_table(TABLE)
    op.drop_index(INDEX, table_name="predictions")
    op.drop_column("predictions", "commit_seq")
