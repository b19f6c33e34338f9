"""Analysis batches: CRUD with etags and soft delete, and progress derived from members.

Progress (counts per state, mean processing time, derived state) is aggregated from the
live member analyses at read time, never kept in counters that could drift. A page of
batches costs two statements: the page and one GROUP BY over all of its batches.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select

from db.errors import FieldViolation, NotFoundError, ValidationError
from db.models import utcnow
from db.models.analyses import AnalysisBatch, TextAnalysis
from db.models.enums import AnalysisState
from db.pagination import JSONValue, Page, SortKey, paginate, parse_order_by
from db.repositories.base import Repository, domain_errors, scope_to_tenant

MAX_DISPLAY_NAME_CHARS = 200
MAX_DESCRIPTION_CHARS = 4000
UPDATABLE_FIELDS = frozenset({"display_name", "description"})

ORDERABLE = {"create_time": AnalysisBatch.create_time, "display_name": AnalysisBatch.display_name}
DEFAULT_ORDER = (SortKey(AnalysisBatch.create_time, descending=True),)


class BatchState(enum.StrEnum):
    """Derived from the live members (mirrors ferrule.v1.BatchState by name)."""

    EMPTY = "EMPTY"
    PENDING = "PENDING"
    PROCESSING = "PROCESSING"
    COMPLETED = "COMPLETED"
    COMPLETED_WITH_FAILURES = "COMPLETED_WITH_FAILURES"


def order_keys(order_by: str | None) -> list[SortKey]:
    """Parse ``order_by`` (ValidationError on ``order_by`` when unknown or malformed)."""
    return parse_order_by(order_by, ORDERABLE, default=DEFAULT_ORDER, tiebreaker=AnalysisBatch.id)


@dataclass(frozen=True, slots=True)
class BatchProgress:
    total: int = 0
    pending: int = 0
    processing: int = 0
    completed: int = 0
    failed: int = 0
    #: Mean processing time of members that have one; None if none has.
    mean_processing_ms: float | None = None

    @property
    def state(self) -> BatchState:
        if self.total == 0:
            return BatchState.EMPTY
        if self.pending == self.total:
            return BatchState.PENDING
        if self.pending or self.processing:
            return BatchState.PROCESSING
        return BatchState.COMPLETED_WITH_FAILURES if self.failed else BatchState.COMPLETED


@dataclass(frozen=True, slots=True)
class BatchView:
    """A batch row with its derived progress."""

    batch: AnalysisBatch
    progress: BatchProgress


@dataclass(frozen=True, slots=True)
class BatchFilter:
    #: Half-open creation-time range [create_time_from, create_time_to).
    create_time_from: datetime | None = None
    create_time_to: datetime | None = None
    show_deleted: bool = False


def batch_violations(values: Mapping[str, Any], prefix: str = "") -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if "display_name" in values:
        name = (values["display_name"] or "").strip()
        if not name or len(name) > MAX_DISPLAY_NAME_CHARS:
            out.append(
                FieldViolation(
                    prefix + "display_name", f"must be 1 to {MAX_DISPLAY_NAME_CHARS} characters"
                )
            )
    description = values.get("description")
    if description is not None and len(description) > MAX_DESCRIPTION_CHARS:
        out.append(
            FieldViolation(
                prefix + "description", f"must be at most {MAX_DESCRIPTION_CHARS} characters"
            )
        )
    return out


class BatchesRepository(Repository[AnalysisBatch]):
    model = AnalysisBatch
    resource_type = "ferrule.v1.AnalysisBatch"
    collection = "batches"

    async def require_live(self, batch_ids: Collection[uuid.UUID]) -> None:
        """NotFoundError naming the first of ``batch_ids`` that is absent or deleted."""
        if not batch_ids:
            return
        stmt = (
            self.select(show_deleted=False)
            .with_only_columns(AnalysisBatch.id)
            .where(AnalysisBatch.id.in_(sorted(batch_ids)))
        )
        found = set((await self.session.execute(stmt)).scalars().all())
        missing = sorted(set(batch_ids) - found)
        if missing:
            raise NotFoundError(self.resource_type, self.resource_name(missing[0]))

    async def progress(self, batch_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, BatchProgress]:
        """Progress of each batch from one GROUP BY over its live members."""
        ids = sorted(set(batch_ids))
        if not ids:
            return {}
        stmt = (
            select(
                TextAnalysis.batch_id,
                TextAnalysis.state,
                func.count(),
                func.count(TextAnalysis.processing_ms),
                func.sum(TextAnalysis.processing_ms),
            )
            .where(TextAnalysis.batch_id.in_(ids), TextAnalysis.delete_time.is_(None))
            .group_by(TextAnalysis.batch_id, TextAnalysis.state)
        )
        stmt = scope_to_tenant(stmt, TextAnalysis.organization_id, self.tenant)
        counts: dict[uuid.UUID, dict[AnalysisState, int]] = {}
        timing: dict[uuid.UUID, tuple[int, float]] = {}
        for batch_id, state, count, n_timed, sum_ms in (await self.session.execute(stmt)).all():
            if batch_id is None:
                continue
            counts.setdefault(batch_id, {})[state] = count
            timed, total_ms = timing.get(batch_id, (0, 0.0))
            timing[batch_id] = (timed + n_timed, total_ms + float(sum_ms or 0.0))
        out: dict[uuid.UUID, BatchProgress] = {}
        for batch_id in ids:
            by_state = counts.get(batch_id, {})
            timed, total_ms = timing.get(batch_id, (0, 0.0))
            out[batch_id] = BatchProgress(
                total=sum(by_state.values()),
                pending=by_state.get(AnalysisState.PENDING, 0),
                processing=by_state.get(AnalysisState.PROCESSING, 0),
                completed=by_state.get(AnalysisState.COMPLETED, 0),
                failed=by_state.get(AnalysisState.FAILED, 0),
                mean_processing_ms=total_ms / timed if timed else None,
            )
        return out

    async def view(self, batch: AnalysisBatch) -> BatchView:
        """The batch with its progress, derived from its live members: what every batch
        read and write answers with."""
        progress = await self.progress([batch.id])
        return BatchView(batch, progress[batch.id])

    async def create(
        self,
        display_name: str,
        *,
        description: str | None = None,
        create_by: str | None = None,
        batch_id: uuid.UUID | None = None,
    ) -> BatchView:
        organization_id = self.tenant.require_organization()
        violations = batch_violations({"display_name": display_name, "description": description})
        if violations:
            raise ValidationError(violations)
        batch = AnalysisBatch(
            organization_id=organization_id,
            display_name=display_name.strip(),
            description=description or None,
            create_by=create_by,
            update_by=create_by,
        )
        if batch_id is not None:
            batch.id = batch_id
        self.session.add(batch)
        async with domain_errors(
            self.resource_type,
            self.resource_name(batch_id or "-"),
            conflict_message="a batch with this id already exists",
        ):
            await self.session.flush()
        return BatchView(batch, BatchProgress())

    async def get_batch(self, batch_id: uuid.UUID) -> BatchView:
        """The batch (also when soft-deleted) with its progress."""
        return await self.view(await self.get(batch_id))

    async def list(
        self,
        filter: BatchFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[BatchView]:
        """A keyset page of batches with progress: the page plus one aggregate (no N+1)."""
        filter = filter or BatchFilter()
        stmt = self.select(show_deleted=filter.show_deleted)
        if filter.create_time_from is not None:
            stmt = stmt.where(AnalysisBatch.create_time >= filter.create_time_from)
        if filter.create_time_to is not None:
            stmt = stmt.where(AnalysisBatch.create_time < filter.create_time_to)
        keys = order_keys(order_by)
        page = await paginate(
            self.session,
            stmt,
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )
        progress = await self.progress(b.id for b in page.items)
        return page.map(lambda batch: BatchView(batch, progress[batch.id]))

    async def update(
        self,
        batch_id: uuid.UUID,
        changes: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
    ) -> BatchView:
        unknown = sorted(set(changes) - UPDATABLE_FIELDS)
        if unknown:
            raise ValidationError([FieldViolation(name, "cannot be updated") for name in unknown])
        violations = batch_violations(changes)
        if violations:
            raise ValidationError(violations)
        values: dict[str, Any] = {}
        if "display_name" in changes:
            values["display_name"] = changes["display_name"].strip()
        if "description" in changes:
            values["description"] = changes["description"] or None
        values.update(update_time=utcnow(), update_by=update_by)
        await self._versioned_update(
            batch_id, values, expected_version=expected_version, deleted=False
        )
        return await self.view(await self.get(batch_id, populate_existing=True))
