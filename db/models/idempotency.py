"""Records that make retried writes safe: AIP-155 request ids and streamed ingest batch ids."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, Integer, String, func
from sqlalchemy.orm import Mapped, mapped_column

from db.models.base import Base, LongBinary, utcnow


class IdempotencyKey(Base):
    """The first result of a create/batch call, replayed when its ``request_id`` comes again.

    Written in the same transaction as the write it describes, so either both exist or neither.
    """

    __tablename__ = "idempotency_keys"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    #: Full gRPC method name, so one request id cannot replay another method's result.
    method: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    resource_name: Mapped[str | None] = mapped_column(String(512))
    #: The serialized response message of the first call.
    response: Mapped[bytes | None] = mapped_column(LongBinary)
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )

    __table_args__ = (Index("ix_idempotency_keys_create_time", "create_time"),)


class IngestBatch(Base):
    """The acknowledgement of one streamed prediction batch, so a re-sent batch id is recognised."""

    __tablename__ = "ingest_batches"

    organization_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), primary_key=True
    )
    batch_id: Mapped[str] = mapped_column(String(128), primary_key=True)
    accepted: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    rejected: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    create_time: Mapped[datetime] = mapped_column(
        default=utcnow, server_default=func.current_timestamp()
    )

    __table_args__ = (Index("ix_ingest_batches_create_time", "create_time"),)
