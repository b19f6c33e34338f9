"""Predictions (seed 002): bulk insert, get, keyset list, export, aggregates, retention.

Predictions are immutable and arrive in bulk, so writes are multi-row
``INSERT ... ON CONFLICT (id) DO NOTHING RETURNING id`` (a re-sent row is skipped, and
the caller learns which rows were new). Export and purge span many transactions on
purpose: each chunk is one short transaction, so neither holds a connection, a snapshot
or locks for the length of a large job. They take a session factory for that reason.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Select, Table, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from db.errors import DomainError
from db.models import Prediction, RiskLevel
from db.models.base import MYSQL_DIALECTS
from db.pagination import (
    MAX_PAGE_SIZE,
    JSONValue,
    Page,
    SortKey,
    paginate,
    parse_order_by,
)
from db.point_reads import PointReader
from db.repositories.base import RecordRead, Repository, bounded, domain_errors, not_found_in
from db.repositories.mysql_inserts import insert_skipping_duplicates
from db.tenancy import Tenant

#: A select of any columns (the filters apply to entity and aggregate selects alike).
AnySelect = Select[*tuple[Any, ...]]

#: Opens one transaction (with the RPC's deadline, on the server) and yields its session.
SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]

ORDERABLE = {"predict_time": Prediction.predict_time, "probability": Prediction.probability}
DEFAULT_ORDER = (SortKey(Prediction.predict_time, descending=True),)

#: Rows per INSERT statement: 12 bind parameters a row stays far below asyncpg's 32767.
INSERT_CHUNK_ROWS = 1000
#: Rows per DELETE transaction of the retention purge (the contract's upper bound).
PURGE_CHUNK_ROWS = 10_000


@dataclass(frozen=True, slots=True)
class PredictionValues:
    """One row's values: every column of :class:`Prediction` under the same names. Built
    validated and ready to insert by ``server/services/prediction_rows.py``, or read back
    by :func:`read_prediction_record`."""

    id: uuid.UUID
    organization_id: uuid.UUID
    subject_id: str
    probability: float
    risk_level: RiskLevel
    model_name: str
    model_version: str
    features: dict[str, Any] | None
    predict_time: datetime
    request_id: str | None
    create_time: datetime
    create_by: str | None

    def as_row(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "organization_id": self.organization_id,
            "subject_id": self.subject_id,
            "probability": self.probability,
            "risk_level": self.risk_level,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "features": self.features,
            "predict_time": self.predict_time,
            "request_id": self.request_id,
            "create_time": self.create_time,
            "create_by": self.create_by,
        }


@dataclass(frozen=True, slots=True)
class PredictionFilter:
    """Set fields are ANDed; None matches everything. ``predict_time`` in [start, end)."""

    subject_id: str | None = None
    risk_level: RiskLevel | None = None
    model_name: str | None = None
    model_version: str | None = None
    start_time: datetime | None = None
    end_time: datetime | None = None
    min_probability: float | None = None


@dataclass(frozen=True, slots=True)
class RiskDistribution:
    total: int
    by_level: dict[RiskLevel, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ModelVersionStatistics:
    model_name: str
    model_version: str
    count: int
    mean_probability: float


@dataclass(frozen=True, slots=True)
class PredictionStatistics:
    """Aggregates over a filter; the probability figures are None when nothing matched."""

    count: int
    mean_probability: float | None
    min_probability: float | None
    max_probability: float | None
    model_versions: list[ModelVersionStatistics] = field(default_factory=list)


class PredictionsRepository(Repository[Prediction]):
    model = Prediction
    resource_type = "ferrule.v1.Prediction"
    collection = "predictions"

    # --- writes ----------------------------------------------------------------------
    async def insert_many(self, rows: Sequence[PredictionValues]) -> set[uuid.UUID]:
        """Insert ``rows``, skipping ids that already exist; returns the ids written.

        Within ``rows`` the first occurrence of an id wins. Runs in the caller's
        transaction, so an atomic caller rolls back by raising afterwards.
        """
        if not rows:
            return set()
        tenant = self.tenant
        if not tenant.all_organizations and any(
            r.organization_id != tenant.organization_id for r in rows
        ):
            raise DomainError("a prediction row belongs to another organization")
        table = cast(Table, Prediction.__table__)
        dialect = self.session.get_bind().dialect.name
        inserted: set[uuid.UUID] = set()
        for start in range(0, len(rows), INSERT_CHUNK_ROWS):
            chunk = [r.as_row() for r in rows[start : start + INSERT_CHUNK_ROWS]]
            async with domain_errors(self.resource_type, self.resource_name("-")):
                if dialect in MYSQL_DIALECTS:
                    written = await insert_skipping_duplicates(
                        self.session, table, chunk, table.c.id
                    )
                else:
                    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
                    stmt = (
                        insert(table)
                        .values(chunk)
                        .on_conflict_do_nothing(index_elements=["id"])
                        .returning(table.c.id)
                    )
                    written = set((await self.session.execute(stmt)).scalars())
            inserted.update(written)
        return inserted

    async def delete_older_than(
        self, cutoff: datetime, *, limit: int = PURGE_CHUNK_ROWS
    ) -> tuple[int, set[uuid.UUID]]:
        """Delete at most ``limit`` rows with ``predict_time < cutoff``.

        Returns how many, and the organizations they belonged to (so caches of exactly
        those organizations can be invalidated, even for an all-organizations purge).
        """
        victims = self.scoped(select(Prediction.id)).where(Prediction.predict_time < cutoff)
        if not self.session.get_bind().dialect.delete_returning:
            return await self._delete_listed(victims.limit(limit))
        stmt = (
            delete(Prediction)
            .where(Prediction.id.in_(bounded(victims.limit(limit)).scalar_subquery()))
            .returning(Prediction.organization_id)
            .execution_options(synchronize_session=False)
        )
        owners = (await self.session.execute(stmt)).scalars().all()
        return len(owners), set(owners)

    async def _delete_listed(self, victims: AnySelect) -> tuple[int, set[uuid.UUID]]:
        """Without DELETE ... RETURNING (MySQL): lock the victims, note their owners, delete."""
        listed = (
            await self.session.execute(
                select(Prediction.id, Prediction.organization_id)
                .where(Prediction.id.in_(bounded(victims).scalar_subquery()))
                .with_for_update()
            )
        ).all()
        if not listed:
            return 0, set()
        await self.session.execute(
            delete(Prediction)
            .where(Prediction.id.in_([row.id for row in listed]))
            .execution_options(synchronize_session=False)
        )
        return len(listed), {row.organization_id for row in listed}

    async def count_older_than(self, cutoff: datetime) -> int:
        stmt = self.scoped(select(func.count()).select_from(Prediction)).where(
            Prediction.predict_time < cutoff
        )
        return int((await self.session.execute(stmt)).scalar_one())

    # --- reads -----------------------------------------------------------------------
    def _filtered(self, stmt: AnySelect, flt: PredictionFilter | None) -> AnySelect:
        stmt = self.scoped(stmt)
        if flt is None:
            return stmt
        if flt.subject_id is not None:
            stmt = stmt.where(Prediction.subject_id == flt.subject_id)
        if flt.risk_level is not None:
            stmt = stmt.where(Prediction.risk_level == flt.risk_level)
        if flt.model_name is not None:
            stmt = stmt.where(Prediction.model_name == flt.model_name)
        if flt.model_version is not None:
            stmt = stmt.where(Prediction.model_version == flt.model_version)
        if flt.start_time is not None:
            stmt = stmt.where(Prediction.predict_time >= flt.start_time)
        if flt.end_time is not None:
            stmt = stmt.where(Prediction.predict_time < flt.end_time)
        if flt.min_probability is not None:
            stmt = stmt.where(Prediction.probability >= flt.min_probability)
        return stmt

    async def list(
        self,
        flt: PredictionFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[Prediction]:
        """A keyset page in ``order_by`` order (default newest ``predict_time`` first)."""
        keys = sort_keys(order_by)
        stmt: AnySelect = self._filtered(select(Prediction), flt)
        return await paginate(
            self.session,
            stmt,
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )

    async def risk_distribution(self, flt: PredictionFilter | None = None) -> RiskDistribution:
        """Count per risk level: one GROUP BY."""
        stmt = self._filtered(
            select(Prediction.risk_level, func.count()).select_from(Prediction), flt
        ).group_by(Prediction.risk_level)
        by_level = {RiskLevel(level): int(n) for level, n in await self.session.execute(stmt)}
        return RiskDistribution(total=sum(by_level.values()), by_level=by_level)

    async def statistics(self, flt: PredictionFilter | None = None) -> PredictionStatistics:
        """Count, mean/min/max probability, and the same per (model name, version)."""
        overall = self._filtered(
            select(
                func.count(),
                func.avg(Prediction.probability),
                func.min(Prediction.probability),
                func.max(Prediction.probability),
            ).select_from(Prediction),
            flt,
        )
        count, mean, low, high = (await self.session.execute(overall)).one()
        if not count:
            return PredictionStatistics(0, None, None, None)
        n = func.count().label("n")
        by_model = (
            self._filtered(
                select(
                    Prediction.model_name,
                    Prediction.model_version,
                    n,
                    func.avg(Prediction.probability),
                ).select_from(Prediction),
                flt,
            )
            .group_by(Prediction.model_name, Prediction.model_version)
            .order_by(n.desc(), Prediction.model_name, Prediction.model_version)
        )
        versions = [
            ModelVersionStatistics(name, version, int(k), float(avg))
            for name, version, k, avg in await self.session.execute(by_model)
        ]
        return PredictionStatistics(int(count), float(mean), float(low), float(high), versions)


def sort_keys(order_by: str | None) -> list[SortKey]:
    """Parse ``order_by`` (INVALID_ARGUMENT on anything but the documented fields)."""
    return parse_order_by(order_by, ORDERABLE, default=DEFAULT_ORDER, tiebreaker=Prediction.id)


async def export_chunks(
    sessions: SessionFactory,
    tenant: Tenant,
    flt: PredictionFilter | None = None,
    *,
    order_by: str | None = None,
    chunk_size: int = 500,
) -> AsyncIterator[list[Prediction]]:
    """Every matching prediction, ``chunk_size`` at a time, in keyset order.

    Each chunk is its own short read transaction and no transaction is open while the
    consumer handles a chunk, so memory and held resources stay constant whatever the
    result size. Not a snapshot: rows inserted meanwhile may or may not appear.
    """
    size = max(1, min(chunk_size, MAX_PAGE_SIZE))
    keys = sort_keys(order_by)  # refuse a bad order_by before opening any transaction
    cursor: list[JSONValue] | None = None
    while True:
        async with sessions() as session:
            repo = PredictionsRepository(session, tenant)
            page = await paginate(
                session,
                repo._filtered(select(Prediction), flt),
                keys,
                page_size=size,
                cursor=cursor,
            )
        if page.items:
            yield page.items
        if page.next_cursor is None:
            return
        cursor = page.next_cursor


async def purge_older_than(
    sessions: SessionFactory,
    tenant: Tenant,
    cutoff: datetime,
    *,
    chunk_size: int = PURGE_CHUNK_ROWS,
    dry_run: bool = False,
    touched: set[uuid.UUID] | None = None,
) -> int:
    """Retention: delete rows with ``predict_time < cutoff``, one transaction per chunk.

    Returns the rows deleted (with ``dry_run``: that would be). Chunks already committed
    stay deleted if a later one fails, so calling again continues where it stopped.
    ``touched`` collects the organizations of committed deletions, even on failure.
    """
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    if dry_run:
        async with sessions() as session:
            return await PredictionsRepository(session, tenant).count_older_than(cutoff)
    total = 0
    while True:
        async with sessions() as session:
            deleted, owners = await PredictionsRepository(session, tenant).delete_older_than(
                cutoff, limit=chunk_size
            )
        if touched is not None:
            touched |= owners
        total += deleted
        if deleted < chunk_size:
            return total


# Predictions are never soft-deleted: show_deleted changes nothing, as in Repository.live.
_PREDICTION_RECORD = RecordRead.of_columns(
    Prediction.__table__,
    PredictionValues,
    not_found=not_found_in(PredictionsRepository.resource_type, PredictionsRepository.collection),
)


async def read_prediction_record(reader: PointReader, prediction_id: uuid.UUID) -> PredictionValues:
    """:meth:`PredictionsRepository.get` for cache loaders: a prebuilt select through
    :class:`~db.point_reads.PointReader` into a plain record (:class:`RecordRead`)."""
    return await _PREDICTION_RECORD.read(reader, prediction_id)
