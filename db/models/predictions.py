"""Predictions (seed 002): immutable model outputs, streamed in at high rates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, FetchedValue, Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, EnumString, IdMixin, TenantMixin, check_between, check_in, utcnow
from db.models.enums import RiskLevel

#: SQLite and MariaDB/MySQL: the per-organization counter the ``commit_seq`` trigger takes
#: (migration 0005). Not a model: PostgreSQL has none, and nothing else reads it.
COMMIT_SEQUENCE_TABLE = "prediction_sequences"
COMMIT_SEQUENCE_INDEX = "ix_predictions_organization_id_commit_seq_id"


class Prediction(IdMixin, TenantMixin, Base):
    """One prediction. Immutable (no update, version or soft delete); purged by retention.

    The id may be supplied by the client so a re-sent row is recognised and not written twice.
    """

    __tablename__ = "predictions"

    #: The seed's employee id: whatever the prediction is about.
    subject_id: Mapped[str] = mapped_column(String(128))
    #: The seed's ``attrition_prob``.
    probability: Mapped[float] = mapped_column()
    risk_level: Mapped[RiskLevel] = mapped_column(EnumString(RiskLevel))
    model_name: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str] = mapped_column(String(50))
    features: Mapped[dict[str, Any] | None] = mapped_column()
    predict_time: Mapped[datetime] = mapped_column()
    #: The request (AIP-155 request_id or stream batch id) that created the row.
    request_id: Mapped[str | None] = mapped_column(String(128))
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )
    create_by: Mapped[str | None] = mapped_column(String(255))
    #: WatchPredictions' commit order, set by the database (never by the application):
    #: on PostgreSQL the writing transaction's id (delivered once no older transaction
    #: is still running), elsewhere a per-organization counter a trigger takes under a
    #: row lock held to the commit. See docs/operations.md, "Watch streams". NULL on rows
    #: written before migration 0005.
    commit_seq: Mapped[int | None] = mapped_column(BigInteger, server_default=FetchedValue())

    __table_args__ = (
        check_between("probability", 0, 1),
        check_in("risk_level", RiskLevel),
        Index(
            "ix_predictions_organization_id_predict_time_id",
            "organization_id",
            "predict_time",
            "id",
        ),
        Index(
            "ix_predictions_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
        ),
        Index(COMMIT_SEQUENCE_INDEX, "organization_id", "commit_seq", "id"),
        Index(
            "ix_predictions_organization_id_subject_id_predict_time",
            "organization_id",
            "subject_id",
            "predict_time",
        ),
        Index(
            "ix_predictions_organization_id_model_version_predict_time",
            "organization_id",
            "model_version",
            "predict_time",
        ),
    )
