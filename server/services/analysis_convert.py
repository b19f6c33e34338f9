"""AnalysisService protobuf <-> domain conversions and request-field validation.

Validation collects every violation of a request (with its full field path) before the
servicer opens a transaction, so an invalid request never touches the database.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, TypeVar

from db.models.analyses import ModelPerformanceRecord, TextAnalysis
from db.models.enums import AnalysisState, AnalysisType, OptimizationTier
from db.repositories.analyses import MAX_RESULT_BYTES, NewAnalysis, SearchHit, field_violations
from db.repositories.batches import BatchProgress, BatchState, BatchView
from db.repositories.model_performance import NewModelPerformance
from ferrule.v1 import analysis_service_pb2 as pb
from server import names
from server.convert import (
    duration_ms,
    enum_from_proto,
    enum_numbers,
    optional_datetime,
    set_duration_ms,
    set_timestamp,
    struct_to_dict,
)
from server.convert import time_range as convert_time_range
from server.etags import etag_of
from server.violations import Violations

T = TypeVar("T")


# --- names ----------------------------------------------------------------------------
def batch_id_in(
    v: Violations, name: str, organization_id: uuid.UUID, field: str
) -> uuid.UUID | None:
    """The batch id of ``name`` (None when empty); it must be in ``organization_id``."""
    if not name:
        return None
    ids = v.call(lambda: names.BATCH.parse(name, field))
    if ids is None:
        return None
    if ids[0] != organization_id:
        v.add(field, "must be a batch of the parent organization")
        return None
    return ids[1]


def optional_id(v: Violations, value: str, field: str) -> uuid.UUID | None:
    if not value:
        return None
    return v.call(lambda: names.parse_resource_id(value, field))


def time_range(
    v: Violations, message: Any, holder: Any, field: str
) -> tuple[datetime | None, datetime | None]:
    """The half-open [start, end) of an optional TimeRange field of ``holder``."""
    if not holder.HasField(field):
        return None, None
    return v.call(lambda: convert_time_range(getattr(holder, field), field)) or (None, None)


# --- enums ----------------------------------------------------------------------------
def analysis_type(v: Violations, value: int, field: str, *, required: bool) -> AnalysisType | None:
    return v.call(
        lambda: enum_from_proto(pb.AnalysisType, value, AnalysisType, field, required=required)
    )


def analysis_state(
    v: Violations, value: int, field: str, *, required: bool
) -> AnalysisState | None:
    return v.call(
        lambda: enum_from_proto(pb.AnalysisState, value, AnalysisState, field, required=required)
    )


def optimization_tier(v: Violations, value: int, field: str) -> OptimizationTier:
    tier = v.call(
        lambda: enum_from_proto(pb.OptimizationTier, value, OptimizationTier, field, required=False)
    )
    return tier or OptimizationTier.STANDARD


# --- analyses -------------------------------------------------------------------------
def result_dict(v: Violations, analysis: pb.Analysis, field: str) -> dict[str, Any] | None:
    if not analysis.HasField("result"):
        return None
    if analysis.result.ByteSize() > MAX_RESULT_BYTES:
        v.add(field, "must be at most 1 MiB serialized")
        return None
    return struct_to_dict(analysis.result)


def new_analysis(
    v: Violations,
    analysis: pb.Analysis,
    analysis_id: str,
    organization_id: uuid.UUID,
    prefix: str,
    *,
    default_batch: uuid.UUID | None = None,
    id_field: str = "analysis_id",
) -> NewAnalysis | None:
    """The domain create of ``analysis``, or None with its violations recorded."""
    before = len(v.items)
    kind = analysis_type(v, analysis.analysis_type, prefix + "analysis_type", required=True)
    state = analysis_state(v, analysis.state, prefix + "state", required=False)
    if state not in (None, AnalysisState.PENDING):
        v.add(prefix + "state", "a new analysis is PENDING")
    batch_id = batch_id_in(v, analysis.batch, organization_id, prefix + "batch") or default_batch
    new = NewAnalysis(
        text=analysis.text,
        analysis_type=kind or AnalysisType.SENTIMENT,
        optimization_tier=optimization_tier(
            v, analysis.optimization_tier, prefix + "optimization_tier"
        ),
        sentiment_score=(
            analysis.sentiment_score if analysis.HasField("sentiment_score") else None
        ),
        quality_score=analysis.quality_score if analysis.HasField("quality_score") else None,
        emotion_scores=dict(analysis.emotion_scores) or None,
        result=result_dict(v, analysis, prefix + "result"),
        processing_ms=(
            duration_ms(analysis.processing_duration)
            if analysis.HasField("processing_duration")
            else None
        ),
        model_used=analysis.model_used or None,
        error_message=analysis.error_message or None,
        batch_id=batch_id,
        analysis_id=optional_id(v, analysis_id, id_field),
    )
    v.extend(field_violations(new.values(), prefix))
    return new if len(v.items) == before else None


# Built once: see enum_numbers.
_ANALYSIS_TYPES = enum_numbers(pb.AnalysisType, AnalysisType)
_TIERS = enum_numbers(pb.OptimizationTier, OptimizationTier)
_ANALYSIS_STATES = enum_numbers(pb.AnalysisState, AnalysisState)
_BATCH_STATES = enum_numbers(pb.BatchState, BatchState)


def analysis_to_proto(row: TextAnalysis, *, deduplicated: bool = False) -> pb.Analysis:
    out = pb.Analysis(
        name=names.ANALYSIS.format(row.organization_id, row.id),
        text=row.text,
        content_hash=row.content_hash,
        analysis_type=_ANALYSIS_TYPES[row.analysis_type],
        optimization_tier=_TIERS[row.optimization_tier],
        state=_ANALYSIS_STATES[row.state],
        emotion_scores={k: float(s) for k, s in (row.emotion_scores or {}).items()},
        model_used=row.model_used or "",
        error_message=row.error_message or "",
        batch=names.BATCH.format(row.organization_id, row.batch_id) if row.batch_id else "",
        deduplicated=deduplicated,
        etag=etag_of(row.version),
        create_by=row.create_by or "",
        update_by=row.update_by or "",
        delete_by=row.delete_by or "",
    )
    if row.sentiment_score is not None:
        out.sentiment_score = row.sentiment_score
    if row.quality_score is not None:
        out.quality_score = row.quality_score
    if row.result is not None:
        out.result.update(row.result)
    set_duration_ms(out.processing_duration, row.processing_ms)
    set_timestamp(out.create_time, row.create_time)
    set_timestamp(out.update_time, row.update_time)
    set_timestamp(out.delete_time, row.delete_time)
    return out


# --- batches --------------------------------------------------------------------------
def progress_to_proto(progress: BatchProgress) -> pb.BatchProgress:
    out = pb.BatchProgress(
        total_count=progress.total,
        pending_count=progress.pending,
        processing_count=progress.processing,
        completed_count=progress.completed,
        failed_count=progress.failed,
    )
    set_duration_ms(out.mean_processing_duration, progress.mean_processing_ms)
    return out


def search_hit_to_proto(hit: SearchHit) -> pb.SearchResult:
    return pb.SearchResult(
        analysis=analysis_to_proto(hit.analysis), score=hit.score, snippet=hit.snippet
    )


def batch_state_to_proto(state: BatchState) -> pb.BatchState.ValueType:
    return _BATCH_STATES[state]


def batch_to_proto(view: BatchView) -> pb.AnalysisBatch:
    row = view.batch
    out = pb.AnalysisBatch(
        name=names.BATCH.format(row.organization_id, row.id),
        display_name=row.display_name,
        description=row.description or "",
        progress=progress_to_proto(view.progress),
        state=batch_state_to_proto(view.progress.state),
        etag=etag_of(row.version),
        create_by=row.create_by or "",
        update_by=row.update_by or "",
        delete_by=row.delete_by or "",
    )
    set_timestamp(out.create_time, row.create_time)
    set_timestamp(out.update_time, row.update_time)
    set_timestamp(out.delete_time, row.delete_time)
    return out


# --- model performance ----------------------------------------------------------------
def new_model_performance(
    v: Violations, record: pb.ModelPerformance, prefix: str
) -> NewModelPerformance | None:
    before = len(v.items)
    start = v.call(
        lambda: optional_datetime(record, "window_start_time", prefix + "window_start_time")
    )
    end = v.call(lambda: optional_datetime(record, "window_end_time", prefix + "window_end_time"))
    if not record.HasField("window_start_time"):
        v.add(prefix + "window_start_time", "required")
    if not record.HasField("window_end_time"):
        v.add(prefix + "window_end_time", "required")
    if start is None or end is None:
        return None

    def opt(field: str) -> float | None:
        return float(getattr(record, field)) if record.HasField(field) else None  # type: ignore[arg-type]

    new = NewModelPerformance(
        model_name=record.model_name,
        model_version=record.model_version,
        window_start=start,
        window_end=end,
        accuracy=opt("accuracy"),
        precision=opt("precision"),
        recall=opt("recall"),
        f1_score=opt("f1_score"),
        mean_latency_ms=(
            duration_ms(record.mean_latency) if record.HasField("mean_latency") else None
        ),
        p95_latency_ms=duration_ms(record.p95_latency) if record.HasField("p95_latency") else None,
        memory_bytes=record.memory_bytes,
        request_count=record.request_count,
        error_count=record.error_count,
    )
    v.extend(new.violations(prefix))
    return new if len(v.items) == before else None


def model_performance_to_proto(row: ModelPerformanceRecord) -> pb.ModelPerformance:
    out = pb.ModelPerformance(
        name=names.MODEL_PERFORMANCE.format(row.organization_id, row.id),
        model_name=row.model_name,
        model_version=row.model_version,
        memory_bytes=row.memory_bytes or 0,
        request_count=row.request_count,
        error_count=row.error_count,
        create_by=row.create_by or "",
    )
    for field in ("accuracy", "precision", "recall", "f1_score"):
        value = getattr(row, field)
        if value is not None:
            setattr(out, field, value)
    set_timestamp(out.window_start_time, row.window_start)
    set_timestamp(out.window_end_time, row.window_end)
    set_duration_ms(out.mean_latency, row.mean_latency_ms)
    set_duration_ms(out.p95_latency, row.p95_latency_ms)
    set_timestamp(out.create_time, row.create_time)
    return out
