"""The request log (seed 002 ``api_requests``): one row per RPC, written in background batches."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, IdMixin, utcnow


class RequestLogEntry(IdMixin, Base):
    __tablename__ = "request_log"

    #: NULL for calls made before a tenant was known (e.g. unauthenticated ones).
    organization_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE")
    )
    method: Mapped[str] = mapped_column(String(255))
    caller: Mapped[str | None] = mapped_column(String(255))
    peer: Mapped[str | None] = mapped_column(String(255))
    user_agent: Mapped[str | None] = mapped_column(String(512))
    #: The gRPC status code's canonical name ("OK", "NOT_FOUND", ...), readable in SQL.
    status_code: Mapped[str] = mapped_column(String(32))
    latency_ms: Mapped[float] = mapped_column()
    request_bytes: Mapped[int | None] = mapped_column(Integer)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )

    __table_args__ = (
        Index(
            "ix_request_log_organization_id_create_time_id",
            "organization_id",
            "create_time",
            "id",
        ),
        Index("ix_request_log_create_time", "create_time"),
    )
