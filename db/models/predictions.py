"""Predictions (seed 002): immutable model outputs, streamed in at high rates."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Index, String, func
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, EnumString, IdMixin, TenantMixin, check_between, check_in, utcnow
from db.models.enums import RiskLevel


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
