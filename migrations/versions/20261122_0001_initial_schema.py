"""Initial schema: every table, named constraints, and row-level security on PostgreSQL.

Hand-reviewed from autogenerate. Column types are the portable base types (the models'
TypeDecorators only change how Python values are bound and read).

Revision ID: 0001
Revises:
Create Date: 2026-11-22 04:59:43.485997
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql, postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: MySQL/MariaDB: DATETIME keeps microseconds only with fsp 6 (stored as UTC, no zone);
#: TEXT and BLOB stop at 64 KiB there, so long text and responses take the LONG types.
TIMESTAMP_TYPE = sa.DateTime(timezone=True).with_variant(mysql.DATETIME(fsp=6), "mysql", "mariadb")
LONG_TEXT = sa.Text().with_variant(mysql.LONGTEXT(), "mysql", "mariadb")
LONG_BINARY = sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb")

#: MySQL/MariaDB have no partial indexes. Unique-among-live-rows keys become a generated
#: column that copies the key's last column while the row is live and is NULL once it is
#: deleted (NULLs never collide), uniquely indexed under the partial index's name. The
#: other partial indexes only speed up listing live rows and are left out there.
#: (index name -> generated column, the column it copies)
MYSQL_LIVE_KEYS = {
    "uq_users_organization_id_email_live": ("email_live", "email"),
    "uq_text_analyses_live_content_hash": ("content_hash_live", "content_hash"),
}


def _is_mysql() -> bool:
    return op.get_bind().dialect.name in ("mysql", "mariadb")


def _now() -> sa.TextClause:
    # MySQL refuses a DATETIME(6) default of lower precision.
    return sa.text("CURRENT_TIMESTAMP(6)" if _is_mysql() else "CURRENT_TIMESTAMP")


def _create_table(name: str, *columns: sa.schema.SchemaItem) -> None:
    """op.create_table; on MySQL/MariaDB InnoDB, utf8mb4 and a binary, no-pad collation, so
    keys compare as on PostgreSQL (case, accents and trailing spaces all count)."""
    options: dict[str, Any] = {}
    if _is_mysql():
        mariadb = bool(getattr(op.get_bind().dialect, "is_mariadb", False))
        options = {
            "mysql_engine": "InnoDB",
            "mysql_charset": "utf8mb4",
            "mysql_collate": "utf8mb4_nopad_bin" if mariadb else "utf8mb4_0900_bin",
        }
    op.create_table(name, *columns, **options)


def _create_live_index(name: str, table: str, columns: list[str], *, unique: bool) -> None:
    """A partial index over live rows (``delete_time IS NULL``); see MYSQL_LIVE_KEYS."""
    if not _is_mysql():
        op.create_index(
            name,
            table,
            columns,
            unique=unique,
            postgresql_where=sa.text("delete_time IS NULL"),
            sqlite_where=sa.text("delete_time IS NULL"),
        )
        return
    if name not in MYSQL_LIVE_KEYS:
        return
    generated, source = MYSQL_LIVE_KEYS[name]
    length = {"email": 320, "content_hash": 64}[source]
    op.add_column(
        table,
        sa.Column(
            generated,
            sa.String(length),
            sa.Computed(f"CASE WHEN delete_time IS NULL THEN {source} END", persisted=False),
            nullable=True,
        ),
    )
    op.create_index(name, table, [*columns[:-1], generated], unique=True)


#: The role the service's transactions switch to: no BYPASSRLS, owns nothing, so the
#: policies below always apply to it. Roles are cluster-wide: created once, never dropped.
APP_ROLE = "ferrule_app"

#: Tables whose rows belong to one organization through ``organization_id``.
TENANT_TABLES = (
    "users",
    "user_profiles",
    "user_sessions",
    "analysis_batches",
    "text_analyses",
    "model_performance_records",
    "predictions",
    "ingest_batches",
    "idempotency_keys",
    "request_log",
)
ALL_TABLES = ("organizations", *TENANT_TABLES)

# nullif(...): an unset or empty setting becomes NULL, and NULL = x matches no row.
_CURRENT_ORG = "nullif(current_setting('ferrule.organization_id', true), '')::uuid"
_ALL_ORGS = "current_setting('ferrule.all_organizations', true) = 'on'"


def _create_row_level_security() -> None:
    op.execute(
        f"""
        DO $$
        BEGIN
            IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = '{APP_ROLE}') THEN
                CREATE ROLE {APP_ROLE} NOLOGIN NOBYPASSRLS;
            END IF;
        EXCEPTION WHEN duplicate_object OR unique_violation THEN
            NULL;  -- created concurrently by another database's migration
        END
        $$
        """
    )
    op.execute(f"GRANT USAGE ON SCHEMA public TO {APP_ROLE}")
    for table in ALL_TABLES:
        key = "id" if table == "organizations" else "organization_id"
        predicate = f"{key} = {_CURRENT_ORG} OR {_ALL_ORGS}"
        op.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} FORCE ROW LEVEL SECURITY")
        op.execute(
            f"CREATE POLICY tenant_isolation ON {table} USING ({predicate}) "
            f"WITH CHECK ({predicate})"
        )
        op.execute(f"GRANT SELECT, INSERT, UPDATE, DELETE ON {table} TO {APP_ROLE}")


def _drop_row_level_security() -> None:
    for table in ALL_TABLES:
        op.execute(f"REVOKE ALL ON {table} FROM {APP_ROLE}")
        op.execute(f"DROP POLICY IF EXISTS tenant_isolation ON {table}")
        op.execute(f"ALTER TABLE {table} NO FORCE ROW LEVEL SECURITY")
        op.execute(f"ALTER TABLE {table} DISABLE ROW LEVEL SECURITY")


def upgrade() -> None:
    _create_table(
        "organizations",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.Column("update_by", sa.String(length=255), nullable=True),
        sa.Column("delete_by", sa.String(length=255), nullable=True),
        sa.Column("delete_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_organizations")),
    )
    op.create_index(
        "ix_organizations_create_time_id", "organizations", ["create_time", "id"], unique=False
    )
    _create_table(
        "analysis_batches",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("display_name", sa.String(length=255), nullable=False),
        sa.Column("description", LONG_TEXT, nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.Column("update_by", sa.String(length=255), nullable=True),
        sa.Column("delete_by", sa.String(length=255), nullable=True),
        sa.Column("delete_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_analysis_batches_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_analysis_batches")),
    )
    _create_live_index(
        "ix_analysis_batches_live_organization_id_create_time_id",
        "analysis_batches",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_analysis_batches_organization_id_create_time_id",
        "analysis_batches",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    _create_table(
        "idempotency_keys",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("method", sa.String(length=255), nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=False),
        sa.Column("resource_name", sa.String(length=512), nullable=True),
        sa.Column("response", LONG_BINARY, nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_idempotency_keys_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "organization_id", "method", "request_id", name=op.f("pk_idempotency_keys")
        ),
    )
    op.create_index(
        "ix_idempotency_keys_create_time", "idempotency_keys", ["create_time"], unique=False
    )
    _create_table(
        "ingest_batches",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("batch_id", sa.String(length=128), nullable=False),
        sa.Column("accepted", sa.Integer(), server_default="0", nullable=False),
        sa.Column("duplicates", sa.Integer(), server_default="0", nullable=False),
        sa.Column("rejected", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_ingest_batches_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("organization_id", "batch_id", name=op.f("pk_ingest_batches")),
    )
    op.create_index(
        "ix_ingest_batches_create_time", "ingest_batches", ["create_time"], unique=False
    )
    # A reserved word in MySQL/MariaDB; PostgreSQL and SQLite take it as it is.
    precision = "`precision`" if _is_mysql() else "precision"
    _create_table(
        "model_performance_records",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("model_version", sa.String(length=50), nullable=False),
        sa.Column("window_start", TIMESTAMP_TYPE, nullable=False),
        sa.Column("window_end", TIMESTAMP_TYPE, nullable=False),
        sa.Column("accuracy", sa.Double(), nullable=True),
        sa.Column("precision", sa.Double(), nullable=True),
        sa.Column("recall", sa.Double(), nullable=True),
        sa.Column("f1_score", sa.Double(), nullable=True),
        sa.Column("mean_latency_ms", sa.Double(), nullable=True),
        sa.Column("p95_latency_ms", sa.Double(), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("request_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("error_count", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            "accuracy >= 0 AND accuracy <= 1", name=op.f("ck_model_performance_records_accuracy")
        ),
        sa.CheckConstraint(
            "f1_score >= 0 AND f1_score <= 1", name=op.f("ck_model_performance_records_f1_score")
        ),
        sa.CheckConstraint(
            "mean_latency_ms >= 0 AND p95_latency_ms >= 0 AND memory_bytes >= 0",
            name=op.f("ck_model_performance_records_costs_non_negative"),
        ),
        sa.CheckConstraint(
            f"{precision} >= 0 AND {precision} <= 1",
            name=op.f("ck_model_performance_records_precision"),
        ),
        sa.CheckConstraint(
            "recall >= 0 AND recall <= 1", name=op.f("ck_model_performance_records_recall")
        ),
        sa.CheckConstraint(
            "request_count >= 0 AND error_count >= 0 AND error_count <= request_count",
            name=op.f("ck_model_performance_records_counts_consistent"),
        ),
        sa.CheckConstraint(
            "window_end >= window_start", name=op.f("ck_model_performance_records_window_ordered")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_model_performance_records_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_performance_records")),
    )
    op.create_index(
        "ix_model_performance_records_model_window",
        "model_performance_records",
        ["organization_id", "model_name", "window_start"],
        unique=False,
    )
    op.create_index(
        "ix_model_performance_records_organization_id_create_time_id",
        "model_performance_records",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    _create_table(
        "predictions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("subject_id", sa.String(length=128), nullable=False),
        sa.Column("probability", sa.Double(), nullable=False),
        sa.Column("risk_level", sa.String(length=32), nullable=False),
        sa.Column("model_name", sa.String(length=100), nullable=False),
        sa.Column("model_version", sa.String(length=50), nullable=False),
        sa.Column("features", JSON_TYPE, nullable=True),
        sa.Column("predict_time", TIMESTAMP_TYPE, nullable=False),
        sa.Column("request_id", sa.String(length=128), nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            "risk_level IN ('LOW', 'MEDIUM', 'HIGH')", name=op.f("ck_predictions_risk_level")
        ),
        sa.CheckConstraint(
            "probability >= 0 AND probability <= 1", name=op.f("ck_predictions_probability")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_predictions_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_predictions")),
    )
    op.create_index(
        "ix_predictions_organization_id_create_time_id",
        "predictions",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_predictions_organization_id_model_version_predict_time",
        "predictions",
        ["organization_id", "model_version", "predict_time"],
        unique=False,
    )
    op.create_index(
        "ix_predictions_organization_id_predict_time_id",
        "predictions",
        ["organization_id", "predict_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_predictions_organization_id_subject_id_predict_time",
        "predictions",
        ["organization_id", "subject_id", "predict_time"],
        unique=False,
    )
    _create_table(
        "request_log",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=True),
        sa.Column("method", sa.String(length=255), nullable=False),
        sa.Column("caller", sa.String(length=255), nullable=True),
        sa.Column("peer", sa.String(length=255), nullable=True),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("status_code", sa.String(length=32), nullable=False),
        sa.Column("latency_ms", sa.Double(), nullable=False),
        sa.Column("request_bytes", sa.Integer(), nullable=True),
        sa.Column("trace_id", sa.String(length=32), nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_request_log_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_request_log")),
    )
    op.create_index("ix_request_log_create_time", "request_log", ["create_time"], unique=False)
    op.create_index(
        "ix_request_log_organization_id_create_time_id",
        "request_log",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    _create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(length=320), nullable=False),
        sa.Column("username", sa.String(length=100), nullable=False),
        sa.Column("full_name", sa.String(length=255), nullable=True),
        sa.Column("role", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("auth_provider", sa.String(length=32), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column("last_login_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.Column("update_by", sa.String(length=255), nullable=True),
        sa.Column("delete_by", sa.String(length=255), nullable=True),
        sa.Column("delete_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.CheckConstraint(
            "auth_provider <> 'EMAIL' OR password_hash IS NOT NULL",
            name=op.f("ck_users_password_required"),
        ),
        sa.CheckConstraint(
            "auth_provider IN ('EMAIL', 'GOOGLE', 'GITHUB', 'SAML')",
            name=op.f("ck_users_auth_provider"),
        ),
        sa.CheckConstraint(
            "role IN ('VIEWER', 'MEMBER', 'ADMIN', 'OWNER')", name=op.f("ck_users_role")
        ),
        sa.CheckConstraint(
            "status IN ('ACTIVE', 'INACTIVE', 'SUSPENDED', 'PENDING_VERIFICATION')",
            name=op.f("ck_users_status"),
        ),
        sa.CheckConstraint("email = lower(email)", name=op.f("ck_users_email_lower_case")),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_users_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
    )
    _create_live_index(
        "ix_users_live_organization_id_create_time_id",
        "users",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_users_organization_id_create_time_id",
        "users",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_users_organization_id_username", "users", ["organization_id", "username"], unique=False
    )
    _create_live_index(
        "uq_users_organization_id_email_live",
        "users",
        ["organization_id", "email"],
        unique=True,
    )
    _create_table(
        "text_analyses",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("text", LONG_TEXT, nullable=False),
        sa.Column("content_hash", sa.String(length=64), nullable=False),
        sa.Column("analysis_type", sa.String(length=32), nullable=False),
        sa.Column("optimization_tier", sa.String(length=32), nullable=False),
        sa.Column("state", sa.String(length=32), nullable=False),
        sa.Column("sentiment_score", sa.Double(), nullable=True),
        sa.Column("quality_score", sa.Double(), nullable=True),
        sa.Column("emotion_scores", JSON_TYPE, nullable=True),
        sa.Column("result", JSON_TYPE, nullable=True),
        sa.Column("processing_ms", sa.Double(), nullable=True),
        sa.Column("model_used", sa.String(length=100), nullable=True),
        sa.Column("error_message", LONG_TEXT, nullable=True),
        sa.Column("batch_id", sa.Uuid(), nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.Column("update_by", sa.String(length=255), nullable=True),
        sa.Column("delete_by", sa.String(length=255), nullable=True),
        sa.Column("delete_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column("version", sa.Integer(), server_default="1", nullable=False),
        sa.CheckConstraint(
            "analysis_type IN ('SENTIMENT', 'QUALITY', 'EMOTION', 'ENTITIES', 'KEYWORDS',"
            " 'SUMMARY', 'LANGUAGE', 'TOXICITY')",
            name=op.f("ck_text_analyses_analysis_type"),
        ),
        sa.CheckConstraint(
            "optimization_tier IN ('STANDARD', 'FAST', 'ACCURATE')",
            name=op.f("ck_text_analyses_optimization_tier"),
        ),
        sa.CheckConstraint(
            "state IN ('PENDING', 'PROCESSING', 'COMPLETED', 'FAILED')",
            name=op.f("ck_text_analyses_state"),
        ),
        sa.CheckConstraint(
            "processing_ms >= 0", name=op.f("ck_text_analyses_processing_ms_non_negative")
        ),
        sa.CheckConstraint(
            "quality_score >= 0 AND quality_score <= 1", name=op.f("ck_text_analyses_quality_score")
        ),
        sa.CheckConstraint(
            "sentiment_score >= -1 AND sentiment_score <= 1",
            name=op.f("ck_text_analyses_sentiment_score"),
        ),
        sa.ForeignKeyConstraint(
            ["batch_id"],
            ["analysis_batches.id"],
            name=op.f("fk_text_analyses_batch_id_analysis_batches"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_text_analyses_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_text_analyses")),
    )
    op.create_index(
        "ix_text_analyses_batch_id_state", "text_analyses", ["batch_id", "state"], unique=False
    )
    _create_live_index(
        "ix_text_analyses_live_organization_id_create_time_id",
        "text_analyses",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_text_analyses_organization_id_create_time_id",
        "text_analyses",
        ["organization_id", "create_time", "id"],
        unique=False,
    )
    op.create_index(
        "ix_text_analyses_organization_id_state",
        "text_analyses",
        ["organization_id", "state"],
        unique=False,
    )
    _create_live_index(
        "uq_text_analyses_live_content_hash",
        "text_analyses",
        ["organization_id", "analysis_type", "content_hash"],
        unique=True,
    )
    _create_table(
        "user_profiles",
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("bio", LONG_TEXT, nullable=True),
        sa.Column("avatar_uri", sa.String(length=2048), nullable=True),
        sa.Column("locale", sa.String(length=35), nullable=True),
        sa.Column("time_zone", sa.String(length=64), nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column(
            "update_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_user_profiles_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_profiles_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("user_id", name=op.f("pk_user_profiles")),
    )
    _create_table(
        "user_sessions",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("organization_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("user_agent", sa.String(length=512), nullable=True),
        sa.Column("peer", sa.String(length=255), nullable=True),
        sa.Column(
            "create_time",
            TIMESTAMP_TYPE,
            server_default=_now(),
            nullable=False,
        ),
        sa.Column("expire_time", TIMESTAMP_TYPE, nullable=False),
        sa.Column("revoke_time", TIMESTAMP_TYPE, nullable=True),
        sa.Column("create_by", sa.String(length=255), nullable=True),
        sa.CheckConstraint(
            "expire_time > create_time", name=op.f("ck_user_sessions_expires_after_creation")
        ),
        sa.ForeignKeyConstraint(
            ["organization_id"],
            ["organizations.id"],
            name=op.f("fk_user_sessions_organization_id_organizations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_user_sessions_user_id_users"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user_sessions")),
        sa.UniqueConstraint("token_sha256", name=op.f("uq_user_sessions_token_sha256")),
    )
    op.create_index(
        "ix_user_sessions_organization_id_user_id_create_time_id",
        "user_sessions",
        ["organization_id", "user_id", "create_time", "id"],
        unique=False,
    )
    if op.get_bind().dialect.name == "postgresql":
        _create_row_level_security()


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _drop_row_level_security()
    op.drop_table("user_sessions")
    op.drop_table("user_profiles")
    op.drop_table("text_analyses")
    op.drop_table("users")
    op.drop_table("request_log")
    op.drop_table("predictions")
    op.drop_table("model_performance_records")
    op.drop_table("ingest_batches")
    op.drop_table("idempotency_keys")
    op.drop_table("analysis_batches")
    op.drop_table("organizations")
