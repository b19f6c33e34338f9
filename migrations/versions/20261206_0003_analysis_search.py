"""Full-text search over analyses' texts (SearchAnalyses).

PostgreSQL: a stored generated ``tsvector`` column over the text and a GIN index on it. A
generated column needs an immutable expression, so the text search configuration is fixed
here, when the column is built: ``FERRULE_SEARCH_CONFIG`` (default ``english``) as read by
the migrating process. The server reads the same setting to build its queries; changing it
later means building the column again (downgrade to 0002, upgrade).
SQLite: an FTS5 external-content table over ``text_analyses.text`` keyed by the rowid,
filled from the existing rows and kept in step by triggers.
MariaDB/MySQL: a FULLTEXT index on the text.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06 12:50:00
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONFIG_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")

SQLITE_TRIGGERS = {
    "text_analyses_search_insert": (
        "AFTER INSERT ON text_analyses BEGIN "
        "INSERT INTO analysis_search(rowid, text) VALUES (new.rowid, new.text); END"
    ),
    "text_analyses_search_delete": (
        "AFTER DELETE ON text_analyses BEGIN "
        "INSERT INTO analysis_search(analysis_search, rowid, text) "
        "VALUES ('delete', old.rowid, old.text); END"
    ),
    "text_analyses_search_update": (
        "AFTER UPDATE OF text ON text_analyses BEGIN "
        "INSERT INTO analysis_search(analysis_search, rowid, text) "
        "VALUES ('delete', old.rowid, old.text); "
        "INSERT INTO analysis_search(rowid, text) VALUES (new.rowid, new.text); END"
    ),
}


def search_config() -> str:
    config = os.environ.get("FERRULE_SEARCH_CONFIG", "").strip() or "english"
    # Spliced into DDL (a generated column's expression cannot take a parameter).
    if not _CONFIG_NAME.fullmatch(config):
        raise ValueError("FERRULE_SEARCH_CONFIG must name a text search configuration")
    return config


def upgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            "ALTER TABLE text_analyses ADD COLUMN search_vector tsvector "
            f"GENERATED ALWAYS AS (to_tsvector('{search_config()}'::regconfig, text)) STORED"
        )
        op.execute(
            "CREATE INDEX ix_text_analyses_search_vector ON text_analyses USING gin (search_vector)"
        )
    elif dialect == "sqlite":
        op.execute(
            "CREATE VIRTUAL TABLE analysis_search USING fts5(text, content='text_analyses', "
            "content_rowid='rowid', tokenize='porter unicode61 remove_diacritics 2')"
        )
        op.execute("INSERT INTO analysis_search(analysis_search) VALUES ('rebuild')")
        for name, body in SQLITE_TRIGGERS.items():
            op.execute(f"CREATE TRIGGER {name} {body}")
    else:
        op.execute(
            "ALTER TABLE text_analyses ADD FULLTEXT INDEX ix_text_analyses_text_fulltext (text)"
        )


def downgrade() -> None:
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute("DROP INDEX ix_text_analyses_search_vector")
        op.execute("ALTER TABLE text_analyses DROP COLUMN search_vector")
    elif dialect == "sqlite":
        for name in SQLITE_TRIGGERS:
            op.execute(f"DROP TRIGGER {name}")
        op.execute("DROP TABLE analysis_search")
    else:
        op.execute("ALTER TABLE text_analyses DROP INDEX ix_text_analyses_text_fulltext")
