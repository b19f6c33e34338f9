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

from sqlalchemy import Select, Table, and_, delete, func, or_, select, text
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
    #: Set by the database as the row commits (WatchPredictions' order); never inserted.
    commit_seq: int | None = None

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


#: PostgreSQL: every transaction below the snapshot's xmin has ended (see migration 0005).
_PG_HORIZON = text("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint - 1")
_PG_START = text(
    "SELECT pg_snapshot_xmin(s)::text::bigint - 1, s::text FROM pg_current_snapshot() AS s"
)
#: Rows a start snapshot saw are not new: skipped until the horizon passes its xmax.
_PG_NOT_IN_START = text(
    "NOT pg_visible_in_snapshot(predictions.commit_seq::text::xid8, "
    "CAST(:tail_snapshot AS pg_snapshot))"
)


@dataclass(frozen=True, slots=True)
class TailPosition:
    """A position in WatchPredictions' commit order: past every row up to ``(commit_seq,
    id)``; with id None, past every row of ``commit_seq`` and below. ``snapshot``
    (PostgreSQL, a watch started "now"): the rows that snapshot saw are past too; it is
    dropped once the horizon passes the snapshot's xmax."""

    commit_seq: int
    id: uuid.UUID | None = None
    snapshot: str | None = None


@dataclass(frozen=True, slots=True)
class TailPage:
    """What :meth:`PredictionsRepository.tail` found after a position."""

    rows: list[Prediction]
    #: Where the next read starts: past the last row, or past everything scanned.
    position: TailPosition
    #: The limit cut the page short: read again at once.
    more: bool
    #: Committed rows exist beyond the horizon (PostgreSQL: an older transaction still
    #: runs); they become readable when it ends, which may notify nobody: read again soon.
    held_back: bool


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

    # --- the tail (WatchPredictions) ---------------------------------------------------
    async def tail_horizon(self) -> int:
        """The highest ``commit_seq`` below which no row can still commit.

        PostgreSQL: the snapshot's xmin minus one (a transaction id: every transaction
        below xmin has ended). Elsewhere the organization's highest visible value: the
        trigger hands values out under a row lock held to the commit, so every lower
        value's transaction has ended too."""
        if self.session.get_bind().dialect.name == "postgresql":
            return int((await self.session.execute(_PG_HORIZON)).scalar_one())
        stmt = self.scoped(select(func.max(Prediction.commit_seq)))
        return int((await self.session.execute(stmt)).scalar_one() or 0)

    async def tail_start(self) -> TailPosition:
        """Now: past every committed row. On PostgreSQL rows below the horizon may still
        commit, so the start also carries the snapshot, which tells them from the rows
        committed before."""
        if self.session.get_bind().dialect.name == "postgresql":
            horizon, snapshot = (await self.session.execute(_PG_START)).one()
            return TailPosition(int(horizon), None, str(snapshot))
        return TailPosition(await self.tail_horizon())

    async def tail(
        self, flt: PredictionFilter | None, after: TailPosition, *, limit: int
    ) -> TailPage:
        """Matching rows after ``after`` up to the horizon, in commit order, at most
        ``limit``. The horizon is read first, in its own statement: every row at or below
        it is committed before the rows are read, so none can appear behind a position
        returned here later (under READ COMMITTED the second statement sees them all)."""
        horizon = await self.tail_horizon()
        seq, ident, snapshot = after.commit_seq, after.id, after.snapshot
        later = Prediction.commit_seq > seq
        if ident is not None:
            later = or_(later, and_(Prediction.commit_seq == seq, Prediction.id > ident))
        stmt = (
            self._filtered(select(Prediction), flt)
            .where(later, Prediction.commit_seq <= horizon)
            .order_by(Prediction.commit_seq, Prediction.id)
            .limit(limit)
        )
        if snapshot is not None:
            stmt = stmt.where(_PG_NOT_IN_START.bindparams(tail_snapshot=snapshot))
        rows = list((await self.session.execute(stmt)).scalars())
        if len(rows) == limit:
            last = rows[-1]
            assert last.commit_seq is not None
            position = TailPosition(last.commit_seq, last.id, snapshot)
            return TailPage(rows, position, more=True, held_back=False)
        if snapshot is not None and horizon >= _snapshot_xmax(snapshot) - 1:
            snapshot = None  # every row the snapshot could concern is behind the horizon
        position = TailPosition(horizon, None, snapshot) if horizon >= seq else after
        beyond = self.scoped(select(Prediction.id)).where(Prediction.commit_seq > max(horizon, seq))
        held_back = (await self.session.execute(beyond.limit(1))).first() is not None
        return TailPage(rows, position, more=False, held_back=held_back)

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


def _snapshot_xmax(snapshot: str) -> int:
    """``xmin:xmax:xip,...`` (PostgreSQL's pg_snapshot text form)."""
    return int(snapshot.split(":")[1])


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
