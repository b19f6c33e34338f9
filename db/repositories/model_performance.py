"""Model performance records (seeds 000, 004): immutable windows of quality and cost."""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime

from db.errors import FieldViolation, ValidationError
from db.models.analyses import ModelPerformanceRecord
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.repositories.base import Repository, domain_errors

MAX_MODEL_NAME_CHARS = 200
MAX_MODEL_VERSION_CHARS = 50

ORDERABLE = {
    "window_start_time": ModelPerformanceRecord.window_start,
    "create_time": ModelPerformanceRecord.create_time,
}
DEFAULT_ORDER = (SortKey(ModelPerformanceRecord.window_start, descending=True),)


def order_keys(order_by: str | None) -> list[SortKey]:
    """Parse ``order_by`` (ValidationError on ``order_by`` when unknown or malformed)."""
    return parse_order_by(
        order_by, ORDERABLE, default=DEFAULT_ORDER, tiebreaker=ModelPerformanceRecord.id
    )


@dataclass(frozen=True, slots=True)
class NewModelPerformance:
    model_name: str
    model_version: str
    window_start: datetime
    window_end: datetime
    accuracy: float | None = None
    precision: float | None = None
    recall: float | None = None
    f1_score: float | None = None
    mean_latency_ms: float | None = None
    p95_latency_ms: float | None = None
    memory_bytes: int | None = None
    request_count: int = 0
    error_count: int = 0

    def violations(self, prefix: str = "") -> list[FieldViolation]:
        """Every rule the contract states, checked before anything is written."""
        out: list[FieldViolation] = []

        def bad(name: str, description: str) -> None:
            out.append(FieldViolation(prefix + name, description))

        if not self.model_name.strip() or len(self.model_name) > MAX_MODEL_NAME_CHARS:
            bad("model_name", f"must be 1 to {MAX_MODEL_NAME_CHARS} characters")
        if not self.model_version.strip() or len(self.model_version) > MAX_MODEL_VERSION_CHARS:
            bad("model_version", f"must be 1 to {MAX_MODEL_VERSION_CHARS} characters")
        if self.window_end < self.window_start:
            bad("window_end_time", "must not be before window_start_time")
        for name in ("accuracy", "precision", "recall", "f1_score"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and 0.0 <= value <= 1.0):
                bad(name, "must be within [0, 1]")
        for name, api in (("mean_latency_ms", "mean_latency"), ("p95_latency_ms", "p95_latency")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                bad(api, "must not be negative")
        if self.memory_bytes is not None and self.memory_bytes < 0:
            bad("memory_bytes", "must not be negative")
        if self.request_count < 0:
            bad("request_count", "must not be negative")
        if not 0 <= self.error_count <= max(self.request_count, 0):
            bad("error_count", "must be within [0, request_count]")
        return out


@dataclass(frozen=True, slots=True)
class ModelPerformanceFilter:
    model_name: str | None = None
    model_version: str | None = None
    #: Half-open range [window_start_from, window_start_to) over window_start.
    window_start_from: datetime | None = None
    window_start_to: datetime | None = None


class ModelPerformanceRepository(Repository[ModelPerformanceRecord]):
    model = ModelPerformanceRecord
    resource_type = "ferrule.v1.ModelPerformance"
    collection = "modelPerformances"

    async def create(
        self,
        new: NewModelPerformance,
        *,
        create_by: str | None = None,
        record_id: uuid.UUID | None = None,
    ) -> ModelPerformanceRecord:
        organization_id = self.tenant.require_organization()
        violations = new.violations()
        if violations:
            raise ValidationError(violations)
        record = ModelPerformanceRecord(
            organization_id=organization_id, create_by=create_by, **asdict(new)
        )
        if record_id is not None:
            record.id = record_id
        self.session.add(record)
        async with domain_errors(
            self.resource_type,
            self.resource_name(record_id or "-"),
            conflict_message="a model performance record with this id already exists",
        ):
            await self.session.flush()
        return record

    async def list(
        self,
        filter: ModelPerformanceFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[ModelPerformanceRecord]:
        """A keyset page (default: latest window first)."""
        filter = filter or ModelPerformanceFilter()
        stmt = self.select()
        if filter.model_name is not None:
            stmt = stmt.where(ModelPerformanceRecord.model_name == filter.model_name)
        if filter.model_version is not None:
            stmt = stmt.where(ModelPerformanceRecord.model_version == filter.model_version)
        if filter.window_start_from is not None:
            stmt = stmt.where(ModelPerformanceRecord.window_start >= filter.window_start_from)
        if filter.window_start_to is not None:
            stmt = stmt.where(ModelPerformanceRecord.window_start < filter.window_start_to)
        keys = order_keys(order_by)
        return await paginate(
            self.session,
            stmt,
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )
