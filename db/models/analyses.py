"""The analyses area (seed 000): text analyses, their batches, model performance windows."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, CheckConstraint, ForeignKey, Index, String, func, text
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import (
    AuditMixin,
    Base,
    EnumString,
    IdMixin,
    LongText,
    SoftDeleteMixin,
    TenantMixin,
    TimestampMixin,
    VersionMixin,
    check_between,
    check_in,
    utcnow,
)
from db.models.enums import AnalysisState, AnalysisType, OptimizationTier

_LIVE = text("delete_time IS NULL")


class AnalysisBatch(
    IdMixin, TenantMixin, TimestampMixin, AuditMixin, SoftDeleteMixin, VersionMixin, Base
):
    """A named group of analyses. Progress is aggregated from members, never stored here."""

    __tablename__ = "analysis_batches"

    display_name: Mapped[str] = mapped_column(String(255))
    description: Mapped[str | None] = mapped_column(LongText)

    __table_args__ = (
        Index(
            "ix_analysis_batches_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
        ),
        Index(
            "ix_analysis_batches_live_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        ),
    )


class TextAnalysis(
    IdMixin, TenantMixin, TimestampMixin, AuditMixin, SoftDeleteMixin, VersionMixin, Base
):
    __tablename__ = "text_analyses"

    text: Mapped[str] = mapped_column(LongText)
    #: SHA-256 hex of the text; with the type it deduplicates live analyses per organization.
    content_hash: Mapped[str] = mapped_column(String(64))
    analysis_type: Mapped[AnalysisType] = mapped_column(EnumString(AnalysisType))
    optimization_tier: Mapped[OptimizationTier] = mapped_column(
        EnumString(OptimizationTier), default=OptimizationTier.STANDARD
    )
    state: Mapped[AnalysisState] = mapped_column(
        EnumString(AnalysisState), default=AnalysisState.PENDING
    )
    sentiment_score: Mapped[float | None] = mapped_column()
    quality_score: Mapped[float | None] = mapped_column()
    emotion_scores: Mapped[dict[str, Any] | None] = mapped_column()
    result: Mapped[dict[str, Any] | None] = mapped_column()
    processing_ms: Mapped[float | None] = mapped_column()
    model_used: Mapped[str | None] = mapped_column(String(200))
    error_message: Mapped[str | None] = mapped_column(LongText)
    batch_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("analysis_batches.id", ondelete="SET NULL")
    )

    __table_args__ = (
        check_in("analysis_type", AnalysisType),
        check_in("optimization_tier", OptimizationTier),
        check_in("state", AnalysisState),
        check_between("sentiment_score", -1, 1),
        check_between("quality_score", 0, 1),
        CheckConstraint("processing_ms >= 0", name="processing_ms_non_negative"),
        Index(
            "uq_text_analyses_live_content_hash",
            "organization_id",
            "analysis_type",
            "content_hash",
            unique=True,
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        ),
        Index(
            "ix_text_analyses_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
        ),
        Index(
            "ix_text_analyses_live_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
            postgresql_where=_LIVE,
            sqlite_where=_LIVE,
        ),
        Index("ix_text_analyses_batch_id_state", "batch_id", "state"),
        Index("ix_text_analyses_organization_id_state", "organization_id", "state"),
    )


class ModelPerformanceRecord(IdMixin, TenantMixin, Base):
    """Quality and cost of one model version over a time window (seeds 000, 004). Immutable."""

    __tablename__ = "model_performance_records"

    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(50))
    window_start: Mapped[datetime] = mapped_column()
    window_end: Mapped[datetime] = mapped_column()
    accuracy: Mapped[float | None] = mapped_column()
    precision: Mapped[float | None] = mapped_column()
    recall: Mapped[float | None] = mapped_column()
    f1_score: Mapped[float | None] = mapped_column()
    mean_latency_ms: Mapped[float | None] = mapped_column()
    p95_latency_ms: Mapped[float | None] = mapped_column()
    memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    request_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    error_count: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )
    create_by: Mapped[str | None] = mapped_column(String(255))

    __table_args__ = (
        check_between("accuracy", 0, 1),
        check_between("precision", 0, 1),
        check_between("recall", 0, 1),
        check_between("f1_score", 0, 1),
        CheckConstraint("window_end >= window_start", name="window_ordered"),
        CheckConstraint(
            "request_count >= 0 AND error_count >= 0 AND error_count <= request_count",
            name="counts_consistent",
        ),
        CheckConstraint(
            "mean_latency_ms >= 0 AND p95_latency_ms >= 0 AND memory_bytes >= 0",
            name="costs_non_negative",
        ),
        Index(
            "ix_model_performance_records_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
        ),
        Index(
            "ix_model_performance_records_model_window",
            "organization_id",
            "model_name",
            "window_start",
        ),
    )
