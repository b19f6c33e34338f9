"""ferrule.v1.PredictionService: create, read, export, aggregate and purge predictions, and
read the request log.

Each RPC: authorize the parent or name (permission before existence), validate every
field, then deadline-bound transactions over the repositories. No SQL here. Row
validation is shared with the streaming ingest (`prediction_rows`); StreamPredictions
itself lives in `prediction_stream` and is only delegated to.
"""

from __future__ import annotations

import importlib
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from db import change_feed as feed
from db.errors import AlreadyExistsError, FieldViolation, ValidationError
from db.models import RequestLogEntry, RiskLevel, new_id
from db.repositories import predictions as prediction_repo
from db.repositories import request_log as request_log_repo
from db.repositories.predictions import (
    PredictionFilter,
    PredictionsRepository,
    PredictionValues,
    read_prediction_record,
)
from db.repositories.request_log import RequestLogFilter, RequestLogRepository
from db.tenancy import Tenant
from ferrule.v1 import common_pb2, prediction_service_pb2_grpc
from ferrule.v1 import prediction_service_pb2 as pb
from server import names
from server.authorization import PermissionDeniedError
from server.call_context import current_call
from server.convert import set_duration_ms, set_timestamp, time_range, to_timedelta
from server.dependencies import Dependencies
from server.idempotency import idempotent
from server.listing import fill_within, page_request, response_byte_budget
from server.names import parse_resource_id
from server.scoping import (
    authorize,
    caller_subject,
    caller_tenant,
    primary_point_reader,
    transaction,
)
from server.services import cached_reads as cr
from server.services import prediction_watch
from server.services.prediction_rows import (
    RowViolation,
    prediction_name,
    prediction_to_proto,
    validate_prediction,
    values_to_proto,
)

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = "ferrule.v1.PredictionService"
StreamHandler = Callable[
    ["Dependencies", AsyncIterator[pb.StreamPredictionsRequest], Context],
    AsyncIterator[pb.StreamPredictionsResponse],
]

MAX_BATCH = 1000
DEFAULT_CHUNK = 500
MAX_CHUNK = 1000
#: BadRequest details travel in trailing metadata (8 KiB by default): list this many.
MAX_REPORTED_VIOLATIONS = 50
ALL_ORGANIZATIONS_PARENT = "organizations/-"
STATUS_CODE_NAMES = frozenset(code.name for code in grpc.StatusCode)

_RISK_LEVELS: dict[int, RiskLevel] = {
    pb.RISK_LEVEL_LOW: RiskLevel.LOW,
    pb.RISK_LEVEL_MEDIUM: RiskLevel.MEDIUM,
    pb.RISK_LEVEL_HIGH: RiskLevel.HIGH,
}
_RISK_FIELDS = {
    RiskLevel.LOW: "low_count",
    RiskLevel.MEDIUM: "medium_count",
    RiskLevel.HIGH: "high_count",
}


# --- request validation --------------------------------------------------------------
def _raise_if_any(violations: Sequence[FieldViolation]) -> None:
    if not violations:
        return
    shown = list(violations[:MAX_REPORTED_VIOLATIONS])
    hidden = len(violations) - len(shown)
    if hidden:
        shown.append(FieldViolation("requests", f"{hidden} more violations not listed"))
    raise ValidationError(shown)


def _authorize_parent(parent: str) -> Tenant:
    (organization_id,) = authorize(names.ORGANIZATION, parent, "parent")
    return Tenant.of(organization_id)


def _authorize_admin_parent(parent: str) -> Tenant:
    """``organizations/-`` (every organization: needs an all-organizations token) or one."""
    if parent == ALL_ORGANIZATIONS_PARENT:
        tenant = caller_tenant()
        if not tenant.all_organizations:
            raise PermissionDeniedError(
                "'organizations/-' needs a token valid for all organizations",
                reason="ORGANIZATION_MISMATCH",
            )
        return tenant
    return _authorize_parent(parent)


def _time_range(
    message: common_pb2.TimeRange, field: str, violations: list[FieldViolation]
) -> tuple[datetime | None, datetime | None]:
    try:
        return time_range(message, field, misordered_path=field)
    except ValidationError as exc:
        violations.extend(exc.violations)
        return None, None


def _prediction_filter(
    message: pb.PredictionFilter, violations: list[FieldViolation], field: str = "filter"
) -> PredictionFilter:
    risk_level = None
    if message.risk_level:
        risk_level = _RISK_LEVELS.get(message.risk_level)
        if risk_level is None:
            violations.append(
                FieldViolation(f"{field}.risk_level", f"unknown value {message.risk_level}")
            )
    min_probability = None
    if message.HasField("min_probability"):
        min_probability = message.min_probability
        if math.isnan(min_probability) or not 0.0 <= min_probability <= 1.0:
            violations.append(FieldViolation(f"{field}.min_probability", "must be within [0, 1]"))
    start, end = _time_range(message.predict_time_range, f"{field}.predict_time_range", violations)
    return PredictionFilter(
        subject_id=message.subject_id or None,
        risk_level=risk_level,
        model_name=message.model_name or None,
        model_version=message.model_version or None,
        start_time=start,
        end_time=end,
        min_probability=min_probability,
    )


def _check_order_by(order_by: str, violations: list[FieldViolation]) -> None:
    try:
        prediction_repo.sort_keys(order_by)
    except ValidationError as exc:
        violations.extend(exc.violations)


def _optional_uuid(value: str, field: str, violations: list[FieldViolation]) -> uuid.UUID | None:
    if not value:
        return None
    try:
        return parse_resource_id(value, field)
    except ValidationError as exc:
        violations.extend(exc.violations)
        return None


def _row_violations(prefix: str, violations: Sequence[RowViolation]) -> list[FieldViolation]:
    return [v.prefixed(prefix) for v in violations]


def _fingerprint(message: Message) -> str:
    return message.SerializeToString(deterministic=True).hex()


def _check_deadline() -> None:
    """Between chunks of a long job: stop once the caller has given up."""
    deadline = current_call().deadline
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeoutError("the deadline expired")


def request_log_to_proto(row: RequestLogEntry) -> pb.RequestLog:
    message = pb.RequestLog(
        name=names.REQUEST_LOG.format(row.organization_id or "-", row.id),
        method=row.method,
        caller=row.caller or "",
        peer=row.peer or "",
        user_agent=row.user_agent or "",
        status_code=row.status_code,
        request_bytes=row.request_bytes or 0,
        trace_id=row.trace_id or "",
    )
    set_duration_ms(message.latency, row.latency_ms)
    set_timestamp(message.create_time, row.create_time)
    return message


def _statistics_to_proto(stats: prediction_repo.PredictionStatistics) -> pb.PredictionStatistics:
    message = pb.PredictionStatistics(
        count=stats.count,
        model_versions=[
            pb.ModelVersionStatistics(
                model_name=m.model_name,
                model_version=m.model_version,
                count=m.count,
                mean_probability=m.mean_probability,
            )
            for m in stats.model_versions
        ],
    )
    if stats.mean_probability is not None:
        message.mean_probability = stats.mean_probability
    if stats.min_probability is not None:
        message.min_probability = stats.min_probability
    if stats.max_probability is not None:
        message.max_probability = stats.max_probability
    return message


class PredictionServicer(prediction_service_pb2_grpc.PredictionServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps

    def _read(self, tenant: Tenant) -> AbstractAsyncContextManager[AsyncSession]:
        return transaction(self.deps, tenant, read_only=True)

    # --- writes ----------------------------------------------------------------------
    async def CreatePrediction(
        self, request: pb.CreatePredictionRequest, context: Context
    ) -> pb.Prediction:
        tenant = _authorize_parent(request.parent)
        organization_id = tenant.require_organization()
        violations: list[FieldViolation] = []
        chosen_id = _optional_uuid(request.prediction_id, "prediction_id", violations)
        _optional_uuid(request.request_id, "request_id", violations)
        prediction_id = chosen_id or new_id()
        values = validate_prediction(
            request.prediction,
            organization_id=organization_id,
            prediction_id=prediction_id,
            request_id=request.request_id or str(uuid.uuid4()),
            create_by=caller_subject(),
        )
        if not isinstance(values, PredictionValues):
            violations += _row_violations("prediction", values)
        _raise_if_any(violations)
        assert isinstance(values, PredictionValues)
        row = values

        async def create(session: AsyncSession) -> pb.Prediction:
            inserted = await PredictionsRepository(session, tenant).insert_many([row])
            await cr.stage_changes(self.deps, session, stale)
            if row.id not in inserted:
                name = prediction_name(organization_id, row.id)
                raise AlreadyExistsError(
                    names.PREDICTION.resource_type, name, f"prediction {name!r} already exists"
                )
            return values_to_proto(row)

        # A new row has no cached entry; the aggregates move; watchers of the tail wake.
        async with cr.invalidation(self.deps) as stale:
            stale.bump(cr.prediction_stats_generation(organization_id))
            stale.changed(feed.PREDICTIONS, organization_id, None)
            return await idempotent(self.deps, tenant, request.request_id, pb.Prediction, create)

    async def BatchCreatePredictions(
        self, request: pb.BatchCreatePredictionsRequest, context: Context
    ) -> pb.BatchCreatePredictionsResponse:
        tenant = _authorize_parent(request.parent)
        organization_id = tenant.require_organization()
        violations: list[FieldViolation] = []
        _optional_uuid(request.request_id, "request_id", violations)
        count = len(request.requests)
        if count == 0:
            violations.append(FieldViolation("requests", "at least one prediction is required"))
        elif count > MAX_BATCH:
            violations.append(FieldViolation("requests", f"at most {MAX_BATCH} predictions"))
            _raise_if_any(violations)  # do not validate an oversized batch row by row
        request_id = request.request_id or str(uuid.uuid4())
        subject = caller_subject()
        now = datetime.now(UTC)
        rows: list[PredictionValues] = []
        first_index: dict[uuid.UUID, int] = {}
        for i, child in enumerate(request.requests):
            prefix = f"requests[{i}]"
            if child.parent and child.parent != request.parent:
                violations.append(
                    FieldViolation(f"{prefix}.parent", "must be empty or equal to parent")
                )
            chosen = _optional_uuid(child.prediction_id, f"{prefix}.prediction_id", violations)
            if chosen is not None:
                if chosen in first_index:
                    violations.append(
                        FieldViolation(
                            f"{prefix}.prediction_id",
                            f"repeats requests[{first_index[chosen]}].prediction_id",
                        )
                    )
                first_index.setdefault(chosen, i)
            values = validate_prediction(
                child.prediction,
                organization_id=organization_id,
                prediction_id=chosen or new_id(),
                request_id=request_id,
                create_by=subject,
                now=now,
            )
            if isinstance(values, PredictionValues):
                rows.append(values)
            else:
                violations += _row_violations(f"{prefix}.prediction", values)
        _raise_if_any(violations)

        async def create(session: AsyncSession) -> pb.BatchCreatePredictionsResponse:
            inserted = await PredictionsRepository(session, tenant).insert_many(rows)
            await cr.stage_changes(self.deps, session, stale)
            taken = [r for r in rows if r.id not in inserted]
            if taken:  # raising rolls the whole batch back: all or none
                name = prediction_name(organization_id, taken[0].id)
                raise AlreadyExistsError(
                    names.PREDICTION.resource_type,
                    name,
                    f"prediction {name!r} already exists ({len(taken)} ids taken)",
                )
            return pb.BatchCreatePredictionsResponse(predictions=[values_to_proto(r) for r in rows])

        async with cr.invalidation(self.deps) as stale:
            stale.bump(cr.prediction_stats_generation(organization_id))  # once per batch
            stale.changed(feed.PREDICTIONS, organization_id, None)
            return await idempotent(
                self.deps, tenant, request.request_id, pb.BatchCreatePredictionsResponse, create
            )

    async def StreamPredictions(
        self, request_iterator: AsyncIterator[pb.StreamPredictionsRequest], context: Context
    ) -> AsyncIterator[pb.StreamPredictionsResponse]:
        try:  # imported lazily: the ingest engine is its own module, built separately
            module = importlib.import_module("server.services.prediction_stream")
        except ModuleNotFoundError as exc:
            if exc.name != "server.services.prediction_stream":
                raise
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "StreamPredictions is not available")
            return
        stream: StreamHandler = module.stream_predictions
        async for response in stream(self.deps, request_iterator, context):
            yield response

    # --- reads -----------------------------------------------------------------------
    async def GetPrediction(
        self, request: pb.GetPredictionRequest, context: Context
    ) -> pb.Prediction:
        organization_id, prediction_id = authorize(names.PREDICTION, request.name)
        tenant = Tenant.of(organization_id)

        async def load() -> pb.Prediction:
            reader = primary_point_reader(self.deps, tenant)
            # The row's columns as PredictionValues, which values_to_proto converts alike.
            return values_to_proto(await read_prediction_record(reader, prediction_id))

        # Immutable rows: only the purge (which bumps this generation) makes one stale.
        return await cr.cached_get(
            self.deps,
            cr.PREDICTION,
            organization_id,
            prediction_id,
            pb.Prediction,
            load,
            generation=cr.predictions_generation(organization_id),
        )

    async def ListPredictions(
        self, request: pb.ListPredictionsRequest, context: Context
    ) -> pb.ListPredictionsResponse:
        tenant = _authorize_parent(request.parent)
        violations: list[FieldViolation] = []
        flt = _prediction_filter(request.filter, violations)
        _check_order_by(request.order_by, violations)
        _raise_if_any(violations)
        paging = page_request(
            self.deps, request, request.parent, _fingerprint(request.filter), request.order_by
        )
        async with self._read(tenant) as session:
            page = await PredictionsRepository(session, tenant).list(
                flt,
                page_size=paging.page_size,
                cursor=paging.cursor,
                order_by=request.order_by,
                include_total=True,
            )
        filled = paging.fill(page, prediction_to_proto)
        return pb.ListPredictionsResponse(
            predictions=filled.items,
            next_page_token=filled.next_page_token,
            total_size=page.total_size or 0,
        )

    async def ExportPredictions(
        self, request: pb.ExportPredictionsRequest, context: Context
    ) -> AsyncIterator[pb.ExportPredictionsResponse]:
        tenant = _authorize_parent(request.parent)
        violations: list[FieldViolation] = []
        flt = _prediction_filter(request.filter, violations)
        _check_order_by(request.order_by, violations)
        if request.chunk_size < 0:
            violations.append(FieldViolation("chunk_size", "must not be negative"))
        _raise_if_any(violations)
        chunk_size = min(request.chunk_size or DEFAULT_CHUNK, MAX_CHUNK)
        chunks = prediction_repo.export_chunks(
            lambda: self._read(tenant),
            tenant,
            flt,
            order_by=request.order_by,
            chunk_size=chunk_size,
        )
        budget = response_byte_budget(self.deps.settings.ferrule_max_message_bytes)
        # grpc.aio awaits each write, so a slow reader pauses the next read: memory stays
        # at one chunk however large the result. A chunk of large rows goes as several
        # messages, each within the byte budget.
        async for chunk in chunks:
            for predictions in fill_within(chunk, prediction_to_proto, budget):
                yield pb.ExportPredictionsResponse(predictions=predictions)
            _check_deadline()

    async def GetRiskDistribution(
        self, request: pb.GetRiskDistributionRequest, context: Context
    ) -> pb.RiskDistribution:
        tenant = _authorize_parent(request.parent)
        violations: list[FieldViolation] = []
        flt = _prediction_filter(request.filter, violations)
        _raise_if_any(violations)

        async def load() -> pb.RiskDistribution:
            async with cr.primary_read(self.deps, tenant) as session:
                result = await PredictionsRepository(session, tenant).risk_distribution(flt)
            message = pb.RiskDistribution(total_count=result.total)
            for level, count in result.by_level.items():
                setattr(message, _RISK_FIELDS[level], count)
            return message

        return await cr.cached_statistics(
            self.deps,
            cr.RISK_DISTRIBUTION,
            cr.prediction_stats_generation(tenant.require_organization()),
            request.filter,
            pb.RiskDistribution,
            load,
        )

    async def GetPredictionStatistics(
        self, request: pb.GetPredictionStatisticsRequest, context: Context
    ) -> pb.PredictionStatistics:
        tenant = _authorize_parent(request.parent)
        violations: list[FieldViolation] = []
        flt = _prediction_filter(request.filter, violations)
        _raise_if_any(violations)

        async def load() -> pb.PredictionStatistics:
            async with cr.primary_read(self.deps, tenant) as session:
                stats = await PredictionsRepository(session, tenant).statistics(flt)
            return _statistics_to_proto(stats)

        return await cr.cached_statistics(
            self.deps,
            cr.PREDICTION_STATISTICS,
            cr.prediction_stats_generation(tenant.require_organization()),
            request.filter,
            pb.PredictionStatistics,
            load,
        )

    async def WatchPredictions(
        self, request: pb.WatchPredictionsRequest, context: Context
    ) -> AsyncIterator[pb.WatchPredictionsResponse]:
        tenant = _authorize_parent(request.parent)
        violations: list[FieldViolation] = []
        flt = _prediction_filter(request.filter, violations)
        _raise_if_any(violations)
        async for response in prediction_watch.watch_predictions(
            self.deps, tenant, flt, _fingerprint(request.filter), request.cursor
        ):
            yield response

    # --- operations (admin) ----------------------------------------------------------
    async def PurgePredictions(
        self, request: pb.PurgePredictionsRequest, context: Context
    ) -> pb.PurgePredictionsResponse:
        tenant = _authorize_admin_parent(request.parent)
        if not request.HasField("older_than"):
            raise ValidationError([FieldViolation("older_than", "required")])
        age = to_timedelta(request.older_than, "older_than")
        if age.total_seconds() <= 0:
            raise ValidationError([FieldViolation("older_than", "must be positive")])
        try:
            cutoff = datetime.now(UTC) - age
        except OverflowError:  # older than year 1: nothing can be that old
            return pb.PurgePredictionsResponse(purged_count=0)
        touched: set[uuid.UUID] = set()
        try:
            purged = await prediction_repo.purge_older_than(
                lambda: transaction(self.deps, tenant),
                tenant,
                cutoff,
                dry_run=request.dry_run,
                touched=touched,
            )
        finally:  # committed chunks stay deleted even when a later one fails
            await cr.forget_predictions(self.deps, touched)
        return pb.PurgePredictionsResponse(purged_count=purged)

    async def ListRequestLogs(
        self, request: pb.ListRequestLogsRequest, context: Context
    ) -> pb.ListRequestLogsResponse:
        tenant = _authorize_admin_parent(request.parent)
        violations: list[FieldViolation] = []
        if request.status_code and request.status_code not in STATUS_CODE_NAMES:
            violations.append(
                FieldViolation("status_code", "not a gRPC status code name, e.g. NOT_FOUND")
            )
        start, end = _time_range(request.create_time_range, "create_time_range", violations)
        try:
            request_log_repo.sort_keys(request.order_by)
        except ValidationError as exc:
            violations.extend(exc.violations)
        _raise_if_any(violations)
        flt = RequestLogFilter(
            method=request.method or None,
            status_code=request.status_code or None,
            start_time=start,
            end_time=end,
        )
        paging = page_request(
            self.deps,
            request,
            request.parent,
            request.method,
            request.status_code,
            _fingerprint(request.create_time_range),
            request.order_by,
        )
        async with self._read(tenant) as session:
            page = await RequestLogRepository(session, tenant).list(
                flt,
                page_size=paging.page_size,
                cursor=paging.cursor,
                order_by=request.order_by,
                include_total=True,
            )
        filled = paging.fill(page, request_log_to_proto)
        return pb.ListRequestLogsResponse(
            request_logs=filled.items,
            next_page_token=filled.next_page_token,
            total_size=page.total_size or 0,
        )


def add_to_server(server: grpc.aio.Server, deps: Dependencies) -> str:
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionServicer(deps), server
    )
    return SERVICE_NAME
