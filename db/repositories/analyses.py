"""Text analyses (seed 000): dedup by content hash, the state machine, bulk create and
statistics.

Deduplication is race-safe: the insert is ``INSERT ... ON CONFLICT DO NOTHING`` against
the partial unique index over live (organization, type, content hash), so two
concurrent creates of the same text end with one row, and the loser reads the winner's.
"""

from __future__ import annotations

import hashlib
import json
import math
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar, cast

from sqlalchemy import Select, Table, func, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import InstrumentedAttribute

from db import search_sql
from db.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    FieldViolation,
    InvalidTransitionError,
    StaleEtagError,
    ValidationError,
)
from db.models import utcnow
from db.models.analyses import TextAnalysis
from db.models.base import MYSQL_DIALECTS, new_id
from db.models.enums import AnalysisState, AnalysisType, OptimizationTier
from db.pagination import JSONValue, Page, SortKey, paginate, paginate_rows, parse_order_by
from db.point_reads import PointReader
from db.repositories.base import RecordRead, Repository, domain_errors, not_found_in
from db.repositories.batches import BatchesRepository
from db.repositories.mysql_inserts import insert_skipping_duplicates
from db.search_query import SearchQuery

S = TypeVar("S", bound=Select[*tuple[Any, ...]])

MAX_TEXT_CHARS = 100_000
MAX_MODEL_USED_CHARS = 200
MAX_ERROR_MESSAGE_CHARS = 4000
MAX_EMOTIONS = 64
MAX_EMOTION_LABEL_CHARS = 64
MAX_RESULT_BYTES = 1 << 20
MAX_BULK = 1000

#: Fields an update may change (model attribute names).
UPDATABLE_FIELDS = frozenset(
    {
        "state",
        "sentiment_score",
        "quality_score",
        "emotion_scores",
        "result",
        "processing_ms",
        "model_used",
        "error_message",
        "optimization_tier",
        "batch_id",
    }
)
#: Model attribute -> API field name, so violations name what the caller sent.
API_FIELD = {"processing_ms": "processing_duration", "batch_id": "batch"}

TERMINAL_STATES = frozenset({AnalysisState.COMPLETED, AnalysisState.FAILED})


def content_hash(text: str) -> str:
    """Lower-case hex SHA-256 of the UTF-8 text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _in_range(value: float, low: float, high: float) -> bool:
    return math.isfinite(value) and low <= value <= high


def field_violations(values: Mapping[str, Any], prefix: str = "") -> list[FieldViolation]:
    """Violations of the analysis field rules among ``values`` (model attribute names).

    Shared by create, bulk create and update so every path enforces the same rules
    before anything is written; ``prefix`` locates the item (e.g. ``requests[3].analysis.``).
    """
    out: list[FieldViolation] = []

    def bad(name: str, description: str) -> None:
        out.append(FieldViolation(prefix + API_FIELD.get(name, name), description))

    if "text" in values:
        text = values["text"]
        if not text:
            bad("text", "required")
        elif len(text) > MAX_TEXT_CHARS:
            bad("text", f"must be at most {MAX_TEXT_CHARS} characters")
    score = values.get("sentiment_score")
    if score is not None and not _in_range(score, -1.0, 1.0):
        bad("sentiment_score", "must be within [-1, 1]")
    score = values.get("quality_score")
    if score is not None and not _in_range(score, 0.0, 1.0):
        bad("quality_score", "must be within [0, 1]")
    emotions = values.get("emotion_scores")
    if emotions:
        if len(emotions) > MAX_EMOTIONS:
            bad("emotion_scores", f"at most {MAX_EMOTIONS} entries")
        for label, value in emotions.items():
            if not label or len(label) > MAX_EMOTION_LABEL_CHARS or label != label.lower():
                bad(
                    "emotion_scores", f"label {label[:80]!r} must be lower-case, 1 to 64 characters"
                )
            elif not _in_range(value, 0.0, 1.0):
                bad("emotion_scores", f"score of {label!r} must be within [0, 1]")
    result = values.get("result")
    if result is not None and len(json.dumps(result, separators=(",", ":"))) > MAX_RESULT_BYTES:
        bad("result", "must be at most 1 MiB serialized")
    processing = values.get("processing_ms")
    if processing is not None and not (math.isfinite(processing) and processing >= 0):
        bad("processing_ms", "must not be negative")
    model = values.get("model_used")
    if model is not None and len(model) > MAX_MODEL_USED_CHARS:
        bad("model_used", f"must be at most {MAX_MODEL_USED_CHARS} characters")
    message = values.get("error_message")
    if message is not None and len(message) > MAX_ERROR_MESSAGE_CHARS:
        bad("error_message", f"must be at most {MAX_ERROR_MESSAGE_CHARS} characters")
    return out


@dataclass(frozen=True, slots=True)
class NewAnalysis:
    """What a caller may set when creating an analysis (always created PENDING)."""

    text: str
    analysis_type: AnalysisType
    optimization_tier: OptimizationTier = OptimizationTier.STANDARD
    sentiment_score: float | None = None
    quality_score: float | None = None
    emotion_scores: dict[str, float] | None = None
    result: dict[str, Any] | None = None
    processing_ms: float | None = None
    model_used: str | None = None
    error_message: str | None = None
    batch_id: uuid.UUID | None = None
    #: Client-chosen id; ignored when the analysis is deduplicated.
    analysis_id: uuid.UUID | None = None

    def values(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "sentiment_score": self.sentiment_score,
            "quality_score": self.quality_score,
            "emotion_scores": self.emotion_scores,
            "result": self.result,
            "processing_ms": self.processing_ms,
            "model_used": self.model_used,
            "error_message": self.error_message,
        }


@dataclass(frozen=True, slots=True)
class CreatedAnalysis:
    analysis: TextAnalysis
    #: True when an existing live analysis with the same text and type was returned.
    deduplicated: bool


@dataclass(frozen=True, slots=True)
class AnalysisFilter:
    """Typed List/statistics filters, combined with AND; None matches everything."""

    analysis_type: AnalysisType | None = None
    state: AnalysisState | None = None
    batch_id: uuid.UUID | None = None
    model_used: str | None = None
    #: Half-open creation-time range [create_time_from, create_time_to).
    create_time_from: datetime | None = None
    create_time_to: datetime | None = None
    show_deleted: bool = False


@dataclass(frozen=True, slots=True)
class SearchHit:
    """An analysis matching a search, its relevance (higher is more relevant; comparable
    within one search only) and a snippet of its text (HTML, matches in <b>)."""

    analysis: TextAnalysis
    score: float
    snippet: str


@dataclass(frozen=True, slots=True)
class AnalysisRecord:
    """A read-only analysis: the columns of :class:`TextAnalysis` under the same names,
    without ORM identity or instrumentation."""

    id: uuid.UUID
    organization_id: uuid.UUID
    text: str
    content_hash: str
    analysis_type: AnalysisType
    optimization_tier: OptimizationTier
    state: AnalysisState
    sentiment_score: float | None
    quality_score: float | None
    emotion_scores: dict[str, Any] | None
    result: dict[str, Any] | None
    processing_ms: float | None
    model_used: str | None
    error_message: str | None
    batch_id: uuid.UUID | None
    create_time: datetime
    update_time: datetime
    delete_time: datetime | None
    create_by: str | None
    update_by: str | None
    delete_by: str | None
    version: int


@dataclass(frozen=True, slots=True)
class ModelStatistics:
    model_used: str | None
    count: int
    mean_processing_ms: float | None


@dataclass(frozen=True, slots=True)
class AnalysisStatistics:
    total: int
    by_type: Mapping[AnalysisType, int] = field(default_factory=dict)
    by_state: Mapping[AnalysisState, int] = field(default_factory=dict)
    #: Ordered by descending count (then model name).
    by_model: Sequence[ModelStatistics] = ()
    mean_processing_ms: float | None = None


#: order_by fields of ListAnalyses. processing_ms is nullable: -1 sorts below any stored
#: (non-negative) value, so rows without a duration come first ascending, last descending.
ORDERABLE: dict[str, InstrumentedAttribute[Any] | SortKey] = {
    "create_time": TextAnalysis.create_time,
    "update_time": TextAnalysis.update_time,
    "processing_duration": SortKey(TextAnalysis.processing_ms, null_as=-1.0),
}


def order_keys(order_by: str | None) -> list[SortKey]:
    """AIP-132 ``order_by`` over create_time, update_time, processing_duration; id last."""
    return parse_order_by(
        order_by,
        ORDERABLE,
        default=[SortKey(TextAnalysis.create_time, descending=True)],
        tiebreaker=TextAnalysis.id,
    )


class AnalysesRepository(Repository[TextAnalysis]):
    model = TextAnalysis
    resource_type = "ferrule.v1.Analysis"
    collection = "analyses"

    # --- create ---------------------------------------------------------------------
    async def create(self, new: NewAnalysis, *, create_by: str | None = None) -> CreatedAnalysis:
        """One analysis, or the live one with the same text and type (deduplicated)."""
        (created,) = await self.bulk_create([new], create_by=create_by)
        return created

    async def bulk_create(
        self, items: Sequence[NewAnalysis], *, create_by: str | None = None
    ) -> list[CreatedAnalysis]:
        """Create ``items`` atomically, in order, each deduplicated against live analyses
        and against earlier items; a constant number of statements whatever the size.

        Raises ValidationError (paths ``requests[i].analysis.<field>`` when more than one
        item), NotFoundError for an absent or deleted batch, AlreadyExistsError for a
        taken analysis_id. Nothing is written when anything fails (the caller's
        transaction rolls back).
        """
        if not items:
            return []
        if len(items) > MAX_BULK:
            raise ValidationError([FieldViolation("requests", f"at most {MAX_BULK} items")])
        organization_id = self.tenant.require_organization()
        violations: list[FieldViolation] = []
        for index, item in enumerate(items):
            prefix = f"requests[{index}].analysis." if len(items) > 1 else ""
            violations += field_violations(item.values(), prefix)
        if violations:
            raise ValidationError(violations)
        batch_ids = {item.batch_id for item in items if item.batch_id is not None}
        await BatchesRepository(self.session, self.tenant).require_live(batch_ids)

        keys = [(item.analysis_type, content_hash(item.text)) for item in items]
        existing = await self._live_by_key(set(keys))
        first_of_key: dict[tuple[AnalysisType, str], int] = {}
        rows: list[dict[str, Any]] = []
        row_of_item: dict[int, uuid.UUID] = {}
        now = utcnow()
        for index, (item, key) in enumerate(zip(items, keys, strict=True)):
            if key in existing or key in first_of_key:
                continue
            first_of_key[key] = index
            row_id = item.analysis_id or new_id()
            row_of_item[index] = row_id
            rows.append(self._row(item, key[1], row_id, organization_id, create_by, now))
        inserted: set[uuid.UUID] = set()
        if rows:
            inserted = await self._insert(rows)
        if len(inserted) < len(rows):
            # A concurrent transaction committed the same text+type first: use its row.
            existing.update(await self._live_by_key(set(keys) - set(existing)))
        ids_of_key: dict[tuple[AnalysisType, str], uuid.UUID] = dict(existing)
        for key, index in first_of_key.items():
            row_id = row_of_item[index]
            if row_id in inserted:
                ids_of_key[key] = row_id
            elif key not in ids_of_key:
                # Skipped, yet no live row holds its text+type: its id was taken (MySQL's
                # INSERT IGNORE skips every duplicate key; ON CONFLICT raised this already).
                raise AlreadyExistsError(
                    self.resource_type,
                    self.resource_name(row_id),
                    "an analysis with this id already exists",
                )
        loaded = await self._load(set(ids_of_key.values()))
        out: list[CreatedAnalysis] = []
        for index, key in enumerate(keys):
            analysis_id = ids_of_key[key]
            fresh = first_of_key.get(key) == index and analysis_id in inserted
            out.append(CreatedAnalysis(loaded[analysis_id], deduplicated=not fresh))
        return out

    @staticmethod
    def _row(
        item: NewAnalysis,
        digest: str,
        row_id: uuid.UUID,
        organization_id: uuid.UUID,
        create_by: str | None,
        now: datetime,
    ) -> dict[str, Any]:
        # Every column explicitly: a multi-row INSERT needs the same keys in every row.
        return {
            "id": row_id,
            "organization_id": organization_id,
            "text": item.text,
            "content_hash": digest,
            "analysis_type": item.analysis_type,
            "optimization_tier": item.optimization_tier,
            "state": AnalysisState.PENDING,
            "sentiment_score": item.sentiment_score,
            "quality_score": item.quality_score,
            "emotion_scores": item.emotion_scores or None,
            "result": item.result,
            "processing_ms": item.processing_ms,
            "model_used": item.model_used or None,
            "error_message": item.error_message or None,
            "batch_id": item.batch_id,
            "create_time": now,
            "update_time": now,
            "create_by": create_by,
            "update_by": create_by,
            "delete_time": None,
            "delete_by": None,
            "version": 1,
        }

    async def _insert(self, rows: list[dict[str, Any]]) -> set[uuid.UUID]:
        """One multi-row INSERT skipping rows whose live text+type exists; the ids written."""
        dialect = self.session.get_bind().dialect.name
        name = self.resource_name(rows[0]["id"]) if len(rows) == 1 else self.resource_name("-")
        async with domain_errors(
            self.resource_type, name, conflict_message="an analysis with this id already exists"
        ):
            if dialect in MYSQL_DIALECTS:
                # Skips id collisions too; create_many tells them apart afterwards.
                table = cast(Table, TextAnalysis.__table__)
                return await insert_skipping_duplicates(self.session, table, rows, table.c.id)
            insert = pg_insert if dialect == "postgresql" else sqlite_insert
            stmt = (
                insert(TextAnalysis)
                .values(rows)
                .on_conflict_do_nothing(
                    index_elements=["organization_id", "analysis_type", "content_hash"],
                    index_where=TextAnalysis.delete_time.is_(None),
                )
                .returning(TextAnalysis.id)
            )
            return set((await self.session.execute(stmt)).scalars().all())

    async def _live_by_key(
        self, keys: set[tuple[AnalysisType, str]]
    ) -> dict[tuple[AnalysisType, str], uuid.UUID]:
        if not keys:
            return {}
        stmt = self.scoped(
            select(TextAnalysis.id, TextAnalysis.analysis_type, TextAnalysis.content_hash)
        ).where(
            TextAnalysis.delete_time.is_(None),
            TextAnalysis.content_hash.in_(sorted({digest for _, digest in keys})),
        )
        found: dict[tuple[AnalysisType, str], uuid.UUID] = {}
        for row_id, analysis_type, digest in (await self.session.execute(stmt)).all():
            if (analysis_type, digest) in keys:
                found[(analysis_type, digest)] = row_id
        return found

    async def _load(self, ids: set[uuid.UUID]) -> dict[uuid.UUID, TextAnalysis]:
        stmt = (
            self.select(show_deleted=True)
            .where(TextAnalysis.id.in_(sorted(ids)))
            .execution_options(populate_existing=True)
        )
        return {a.id: a for a in (await self.session.execute(stmt)).scalars().all()}

    # --- reads ----------------------------------------------------------------------
    def _filtered(self, filter: AnalysisFilter) -> Select[TextAnalysis]:
        stmt = self.select(show_deleted=filter.show_deleted)
        return self._apply_filter(stmt, filter)

    @staticmethod
    def _apply_filter(stmt: S, filter: AnalysisFilter) -> S:
        if filter.analysis_type is not None:
            stmt = stmt.where(TextAnalysis.analysis_type == filter.analysis_type)
        if filter.state is not None:
            stmt = stmt.where(TextAnalysis.state == filter.state)
        if filter.batch_id is not None:
            stmt = stmt.where(TextAnalysis.batch_id == filter.batch_id)
        if filter.model_used is not None:
            stmt = stmt.where(TextAnalysis.model_used == filter.model_used)
        if filter.create_time_from is not None:
            stmt = stmt.where(TextAnalysis.create_time >= filter.create_time_from)
        if filter.create_time_to is not None:
            stmt = stmt.where(TextAnalysis.create_time < filter.create_time_to)
        return stmt

    async def list(
        self,
        filter: AnalysisFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        order_by: str | None = None,
        include_total: bool = False,
    ) -> Page[TextAnalysis]:
        """A keyset page (default order: newest first)."""
        keys = order_keys(order_by)
        return await paginate(
            self.session,
            self._filtered(filter or AnalysisFilter()),
            keys,
            page_size=page_size,
            cursor=cursor,
            include_total=include_total,
        )

    async def search(
        self,
        query: SearchQuery,
        filter: AnalysisFilter | None = None,
        *,
        page_size: int = 0,
        cursor: Sequence[JSONValue] | None = None,
        pg_config: str = search_sql.DEFAULT_PG_CONFIG,
    ) -> Page[SearchHit]:
        """A keyset page of the analyses matching ``query``, most relevant first (ties by
        id), each with its score and snippet; ``pg_config`` is PostgreSQL's text search
        configuration (the one the search column was built with).

        Two statements: the page of (id, score) through the index, then the page's rows
        with their snippets, so snippets are made for the page only.
        """
        filter = filter or AnalysisFilter()
        dialect = self.session.get_bind().dialect.name
        rendered = search_sql.render(query, dialect, pg_config)
        hits = select(TextAnalysis.id.label("id"), rendered.score.label("score"))
        if rendered.joins_fts:
            fts = search_sql.fts_table
            hits = hits.select_from(
                fts.join(TextAnalysis, search_sql.analysis_rowid == fts.c.rowid)
            )
        hits = self.live(self.scoped(hits.where(rendered.match)), show_deleted=filter.show_deleted)
        ranked = self._apply_filter(hits, filter).subquery("hits")
        keys = [SortKey(ranked.c.score, descending=True), SortKey(ranked.c.id, descending=True)]
        page = await paginate_rows(
            self.session,
            select(ranked.c.id, ranked.c.score),
            keys,
            page_size=page_size,
            cursor=cursor,
        )
        ids = [row.id for row in page.items]
        if not ids:
            return Page([], None, keys=keys)
        snippets: dict[uuid.UUID, str] = {}
        by_id: dict[uuid.UUID, TextAnalysis] = {}
        if dialect == "postgresql":
            headline = search_sql.pg_headline(query, pg_config)
            for analysis, snippet in await self.session.execute(
                select(TextAnalysis, headline).where(TextAnalysis.id.in_(ids))
            ):
                by_id[analysis.id], snippets[analysis.id] = analysis, snippet
        else:
            loaded = await self.session.execute(
                select(TextAnalysis).where(TextAnalysis.id.in_(ids))
            )
            by_id = {a.id: a for a in loaded.scalars()}
            if dialect == "sqlite":
                rows = await self.session.execute(search_sql.sqlite_snippets(query, ids))
                snippets = {analysis_id: snippet for analysis_id, snippet in rows}
            else:
                words = query.included_words()
                snippets = {i: search_sql.cut_snippet(a.text, words) for i, a in by_id.items()}
        return Page(
            [
                SearchHit(
                    by_id[row.id],
                    float(row.score),
                    search_sql.snippet_html(snippets.get(row.id, "")),
                )
                for row in page.items
            ],
            page.next_cursor,
            keys=page.keys,
            rows=page.rows,
        )

    async def statistics(self, filter: AnalysisFilter | None = None) -> AnalysisStatistics:
        """Counts by type, state and model plus mean processing times: one GROUP BY.

        Live analyses only (``filter.state`` and ``show_deleted`` are ignored).
        """
        filter = replace(filter or AnalysisFilter(), state=None, show_deleted=False)
        columns = (TextAnalysis.analysis_type, TextAnalysis.state, TextAnalysis.model_used)
        stmt = self.live(
            self.scoped(
                select(
                    *columns,
                    func.count(),
                    func.count(TextAnalysis.processing_ms),
                    func.sum(TextAnalysis.processing_ms),
                ).group_by(*columns)
            )
        )
        stmt = self._apply_filter(stmt, filter)
        by_type: dict[AnalysisType, int] = {}
        by_state: dict[AnalysisState, int] = {}
        models: dict[str | None, list[float]] = {}  # model -> [count, timed, sum]
        total, timed, time_sum = 0, 0, 0.0
        for analysis_type, state, model, count, n_timed, sum_ms in (
            await self.session.execute(stmt)
        ).all():
            total += count
            by_type[analysis_type] = by_type.get(analysis_type, 0) + count
            by_state[state] = by_state.get(state, 0) + count
            acc = models.setdefault(model, [0, 0, 0.0])
            acc[0] += count
            acc[1] += n_timed
            acc[2] += float(sum_ms or 0.0)
            timed += n_timed
            time_sum += float(sum_ms or 0.0)
        by_model = sorted(
            (
                ModelStatistics(model, int(count), sum_ms / n_timed if n_timed else None)
                for model, (count, n_timed, sum_ms) in models.items()
            ),
            key=lambda m: (-m.count, m.model_used or ""),
        )
        return AnalysisStatistics(
            total=total,
            by_type=by_type,
            by_state=by_state,
            by_model=by_model,
            mean_processing_ms=time_sum / timed if timed else None,
        )

    # --- writes -----------------------------------------------------------------------
    async def update(
        self,
        analysis_id: uuid.UUID,
        changes: Mapping[str, Any],
        *,
        expected_version: int | None = None,
        update_by: str | None = None,
    ) -> TextAnalysis:
        """Apply ``changes`` (model attribute names) to a live analysis.

        The state machine is enforced on the locked row: an illegal transition is
        InvalidTransitionError; in a terminal state only ``batch_id`` may change
        (FailedPreconditionError). Values equal to the current ones are not changes, so
        re-sending the current state is a no-op.
        """
        unknown = sorted(set(changes) - UPDATABLE_FIELDS)
        if unknown:
            raise ValidationError([FieldViolation(name, "cannot be updated") for name in unknown])
        violations = field_violations(changes)
        if "state" in changes and changes["state"] is None:
            violations.append(FieldViolation("state", "required"))
        if "optimization_tier" in changes and changes["optimization_tier"] is None:
            violations.append(FieldViolation("optimization_tier", "required"))
        if violations:
            raise ValidationError(violations)
        normalized = {
            name: (value or None)
            if name in {"model_used", "error_message", "emotion_scores"}
            else value
            for name, value in changes.items()
        }
        # Lock the row (PostgreSQL; SQLite serializes writers) so the transition checked
        # here is the one applied.
        stmt = (
            self.select(show_deleted=False)
            .where(TextAnalysis.id == analysis_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        )
        current = (await self.session.execute(stmt)).scalar_one_or_none()
        if current is None:
            raise self.not_found(analysis_id)
        name = self.resource_name(analysis_id)
        if expected_version is not None and expected_version != current.version:
            raise StaleEtagError(name)
        changed = {k: v for k, v in normalized.items() if getattr(current, k) != v}
        target: AnalysisState | None = changed.get("state")
        if target is not None and not current.state.can_become(target):
            raise InvalidTransitionError(name, current.state.value, target.value)
        if current.state in TERMINAL_STATES:
            frozen = sorted(API_FIELD.get(k, k) for k in changed if k != "batch_id")
            if frozen:
                raise FailedPreconditionError(
                    f"{name!r} is {current.state.value}: only its batch may change"
                    f" (refused: {', '.join(frozen)})"
                )
        new_batch: uuid.UUID | None = changed.get("batch_id")
        if new_batch is not None:
            await BatchesRepository(self.session, self.tenant).require_live({new_batch})
        if not changed:
            return current
        values = {**changed, "update_time": utcnow(), "update_by": update_by}
        await self._versioned_update(
            analysis_id, values, expected_version=current.version, deleted=False
        )
        return await self.get(analysis_id, populate_existing=True)


_ANALYSIS_RECORD = RecordRead.of_columns(
    TextAnalysis.__table__,
    AnalysisRecord,
    not_found=not_found_in(AnalysesRepository.resource_type, AnalysesRepository.collection),
)


async def read_analysis_record(
    reader: PointReader, analysis_id: uuid.UUID, *, show_deleted: bool = True
) -> AnalysisRecord:
    """:meth:`AnalysesRepository.get` for cache loaders: a prebuilt select through
    :class:`~db.point_reads.PointReader` into a plain record (:class:`RecordRead`)."""
    return await _ANALYSIS_RECORD.read(reader, analysis_id, show_deleted=show_deleted)
