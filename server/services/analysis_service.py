"""ferrule.v1.AnalysisService: analyses, batches, model performance records, statistics.

Each RPC: authorize the name (permission before existence), validate every field, then
one deadline-bound transaction over the repositories. No SQL here; conversions and
field validation live in `analysis_convert`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, cast

import grpc
from sqlalchemy.ext.asyncio import AsyncSession

from db import change_feed as feed
from db import search_query
from db.models.analyses import TextAnalysis
from db.models.enums import AnalysisState, AnalysisType
from db.repositories import batches as batches_repo
from db.repositories import model_performance as mp_repo
from db.repositories.analyses import (
    MAX_TEXT_CHARS,
    AnalysesRepository,
    AnalysisFilter,
    AnalysisStatistics,
    NewAnalysis,
    field_violations,
    order_keys,
    read_analysis_record,
)
from db.repositories.batches import BatchesRepository, BatchFilter, batch_violations
from db.repositories.model_performance import ModelPerformanceFilter, ModelPerformanceRepository
from db.tenancy import Tenant
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import analysis_service_pb2_grpc
from server import names
from server.convert import duration_ms, enum_to_proto, set_duration_ms
from server.dependencies import Dependencies
from server.etags import expected_version
from server.field_masks import resolve_update_mask
from server.idempotency import idempotent
from server.listing import page_request
from server.scoping import (
    authorize,
    authorize_organization,
    caller_subject,
    primary_point_reader,
    transaction,
)
from server.services import analysis_convert as cv
from server.services import cached_reads as cr
from server.services import watches
from server.violations import Violations

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = "ferrule.v1.AnalysisService"
MAX_BATCH_CREATE = 1000
#: The longest query SearchAnalyses reads (as long as the longest text it searches).
MAX_SEARCH_QUERY_CHARS = MAX_TEXT_CHARS

ANALYSIS_MUTABLE_PATHS = frozenset(
    {
        "state",
        "sentiment_score",
        "quality_score",
        "emotion_scores",
        "result",
        "processing_duration",
        "model_used",
        "error_message",
        "optimization_tier",
        "batch",
    }
)
BATCH_MUTABLE_PATHS = frozenset({"display_name", "description"})


def _parent(parent: str) -> tuple[uuid.UUID, Tenant]:
    (organization_id,) = names.ORGANIZATION.parse(parent, "parent")
    return organization_id, authorize_organization(organization_id)


def _request_id(v: Violations, request_id: str) -> None:
    if request_id:
        cv.optional_id(v, request_id, "request_id")


class AnalysisServicer(analysis_service_pb2_grpc.AnalysisServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self.deps = deps

    # --- analyses ---------------------------------------------------------------------
    async def CreateAnalysis(
        self, request: pb.CreateAnalysisRequest, context: Context
    ) -> pb.Analysis:
        organization_id, tenant = _parent(request.parent)
        v = Violations()
        new = cv.new_analysis(
            v, request.analysis, request.analysis_id, organization_id, "analysis."
        )
        _request_id(v, request.request_id)
        v.raise_if_any()
        assert new is not None
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.Analysis:
            created = await AnalysesRepository(session, tenant).create(new, create_by=subject)
            await cr.stage_changes(self.deps, session, stale)
            return cv.analysis_to_proto(created.analysis, deduplicated=created.deduplicated)

        # New rows have no cached entry; the statistics and a member batch's progress move.
        async with cr.invalidation(self.deps) as stale:
            stale.bump(cr.analyses_generation(organization_id))
            stale.changed(feed.ANALYSIS, organization_id, None)
            return await idempotent(self.deps, tenant, request.request_id, pb.Analysis, create)

    async def GetAnalysis(self, request: pb.GetAnalysisRequest, context: Context) -> pb.Analysis:
        organization_id, analysis_id = authorize(names.ANALYSIS, request.name)
        tenant = Tenant.of(organization_id)

        async def load() -> pb.Analysis:
            reader = primary_point_reader(self.deps, tenant)
            record = await read_analysis_record(reader, analysis_id)
            # An AnalysisRecord has every column of TextAnalysis under the same name
            # (db/repositories/analyses.py), and analysis_to_proto reads only columns.
            return cv.analysis_to_proto(cast(TextAnalysis, record))

        return await cr.cached_get(
            self.deps, cr.ANALYSIS, organization_id, analysis_id, pb.Analysis, load
        )

    async def ListAnalyses(
        self, request: pb.ListAnalysesRequest, context: Context
    ) -> pb.ListAnalysesResponse:
        organization_id, tenant = _parent(request.parent)
        v = Violations()
        filter = self._analysis_filter(v, request, organization_id)
        start, end = filter.create_time_from, filter.create_time_to
        with v.collect():
            order_keys(request.order_by)
        v.raise_if_any()
        page_req = page_request(
            self.deps,
            request,
            request.parent,
            request.analysis_type,
            request.state,
            request.batch,
            request.model_used,
            start,
            end,
            request.order_by,
            request.show_deleted,
        )
        async with transaction(self.deps, tenant, read_only=True) as session:
            page = await AnalysesRepository(session, tenant).list(
                filter,
                page_size=page_req.page_size,
                cursor=page_req.cursor,
                order_by=request.order_by,
                include_total=True,
            )
        filled = page_req.fill(page, cv.analysis_to_proto)
        return pb.ListAnalysesResponse(
            analyses=filled.items,
            next_page_token=filled.next_page_token,
            total_size=page.total_size or 0,
        )

    async def SearchAnalyses(
        self, request: pb.SearchAnalysesRequest, context: Context
    ) -> pb.SearchAnalysesResponse:
        organization_id, tenant = _parent(request.parent)
        v = Violations()
        if not request.query:
            v.add("query", "required")
        elif len(request.query) > MAX_SEARCH_QUERY_CHARS:
            v.add("query", f"must be at most {MAX_SEARCH_QUERY_CHARS} characters")
        filter = self._analysis_filter(v, request, organization_id)
        v.raise_if_any()
        page_req = page_request(
            self.deps,
            request,
            request.parent,
            request.query,
            request.analysis_type,
            request.state,
            request.batch,
            request.model_used,
            filter.create_time_from,
            filter.create_time_to,
            request.show_deleted,
        )
        async with transaction(self.deps, tenant, read_only=True) as session:
            page = await AnalysesRepository(session, tenant).search(
                search_query.parse(request.query),
                filter,
                page_size=page_req.page_size,
                cursor=page_req.cursor,
                pg_config=self.deps.settings.ferrule_search_config,
            )
        filled = page_req.fill(page, cv.search_hit_to_proto)
        return pb.SearchAnalysesResponse(
            results=filled.items, next_page_token=filled.next_page_token
        )

    @staticmethod
    def _analysis_filter(
        v: Violations,
        request: pb.ListAnalysesRequest | pb.SearchAnalysesRequest,
        organization_id: uuid.UUID,
    ) -> AnalysisFilter:
        """The typed filters ListAnalyses and SearchAnalyses share."""
        start, end = cv.time_range(v, request, request, "create_time_range")
        return AnalysisFilter(
            analysis_type=cv.analysis_type(
                v, request.analysis_type, "analysis_type", required=False
            ),
            state=cv.analysis_state(v, request.state, "state", required=False),
            batch_id=cv.batch_id_in(v, request.batch, organization_id, "batch"),
            model_used=request.model_used or None,
            create_time_from=start,
            create_time_to=end,
            show_deleted=request.show_deleted,
        )

    async def UpdateAnalysis(
        self, request: pb.UpdateAnalysisRequest, context: Context
    ) -> pb.Analysis:
        organization_id, analysis_id = authorize(
            names.ANALYSIS, request.analysis.name, "analysis.name"
        )
        tenant = Tenant.of(organization_id)
        analysis = request.analysis
        v = Violations()
        paths = v.call(
            lambda: resolve_update_mask(request.update_mask, analysis, ANALYSIS_MUTABLE_PATHS)
        )
        changes: dict[str, Any] = {}
        for path in sorted(paths or ()):
            field = f"analysis.{path}"
            match path:
                case "state":
                    changes["state"] = cv.analysis_state(v, analysis.state, field, required=True)
                case "sentiment_score" | "quality_score":
                    changes[path] = getattr(analysis, path) if analysis.HasField(path) else None
                case "emotion_scores":
                    changes[path] = dict(analysis.emotion_scores) or None
                case "result":
                    changes[path] = cv.result_dict(v, analysis, field)
                case "processing_duration":
                    changes["processing_ms"] = (
                        duration_ms(analysis.processing_duration)
                        if analysis.HasField("processing_duration")
                        else None
                    )
                case "model_used" | "error_message":
                    changes[path] = getattr(analysis, path) or None
                case "optimization_tier":
                    changes[path] = cv.optimization_tier(v, analysis.optimization_tier, field)
                case "batch":
                    changes["batch_id"] = cv.batch_id_in(v, analysis.batch, organization_id, field)
        v.extend(field_violations(changes, "analysis."))
        version = v.call(lambda: expected_version(analysis.etag, "analysis.etag"))
        v.raise_if_any()
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            self._analysis_written(stale, organization_id, analysis_id)
            row = await AnalysesRepository(session, tenant).update(
                analysis_id, changes, expected_version=version, update_by=caller_subject()
            )
            return cv.analysis_to_proto(row)

    async def DeleteAnalysis(
        self, request: pb.DeleteAnalysisRequest, context: Context
    ) -> pb.Analysis:
        organization_id, analysis_id = authorize(names.ANALYSIS, request.name)
        tenant = Tenant.of(organization_id)
        version = expected_version(request.etag)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            self._analysis_written(stale, organization_id, analysis_id)
            row = await AnalysesRepository(session, tenant).soft_delete(
                analysis_id, expected_version=version, delete_by=caller_subject()
            )
            return cv.analysis_to_proto(row)

    async def UndeleteAnalysis(
        self, request: pb.UndeleteAnalysisRequest, context: Context
    ) -> pb.Analysis:
        organization_id, analysis_id = authorize(names.ANALYSIS, request.name)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            self._analysis_written(stale, organization_id, analysis_id)
            row = await AnalysesRepository(session, tenant).undelete(
                analysis_id, update_by=caller_subject()
            )
            return cv.analysis_to_proto(row)

    async def BatchCreateAnalyses(
        self, request: pb.BatchCreateAnalysesRequest, context: Context
    ) -> pb.BatchCreateAnalysesResponse:
        organization_id, tenant = _parent(request.parent)
        v = Violations()
        if not request.requests:
            v.add("requests", "required: 1 to 1000 requests")
        elif len(request.requests) > MAX_BATCH_CREATE:
            v.add("requests", f"at most {MAX_BATCH_CREATE} requests")
        top_batch = cv.batch_id_in(v, request.batch, organization_id, "batch")
        items: list[NewAnalysis] = []
        for index, child in enumerate(request.requests[:MAX_BATCH_CREATE]):
            prefix = f"requests[{index}]."
            if child.parent and child.parent != request.parent:
                v.add(prefix + "parent", "must be empty or equal to the top-level parent")
            if request.batch and child.analysis.batch and child.analysis.batch != request.batch:
                v.add(prefix + "analysis.batch", "must be empty or equal to the top-level batch")
            new = cv.new_analysis(
                v,
                child.analysis,
                child.analysis_id,
                organization_id,
                prefix + "analysis.",
                default_batch=top_batch,
                id_field=prefix + "analysis_id",
            )
            if new is not None:
                items.append(new)
        _request_id(v, request.request_id)
        v.raise_if_any()
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.BatchCreateAnalysesResponse:
            created = await AnalysesRepository(session, tenant).bulk_create(
                items, create_by=subject
            )
            await cr.stage_changes(self.deps, session, stale)
            return pb.BatchCreateAnalysesResponse(
                analyses=[
                    cv.analysis_to_proto(c.analysis, deduplicated=c.deduplicated) for c in created
                ]
            )

        async with cr.invalidation(self.deps) as stale:
            stale.bump(cr.analyses_generation(organization_id))  # once for all the rows
            stale.changed(feed.ANALYSIS, organization_id, None)
            return await idempotent(
                self.deps, tenant, request.request_id, pb.BatchCreateAnalysesResponse, create
            )

    # --- batches ----------------------------------------------------------------------
    async def CreateBatch(
        self, request: pb.CreateBatchRequest, context: Context
    ) -> pb.AnalysisBatch:
        _, tenant = _parent(request.parent)
        v = Violations()
        batch = request.batch
        v.extend(
            batch_violations(
                {"display_name": batch.display_name, "description": batch.description}, "batch."
            )
        )
        batch_id = cv.optional_id(v, request.batch_id, "batch_id")
        _request_id(v, request.request_id)
        v.raise_if_any()
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.AnalysisBatch:
            view = await BatchesRepository(session, tenant).create(
                batch.display_name,
                description=batch.description or None,
                create_by=subject,
                batch_id=batch_id,
            )
            return cv.batch_to_proto(view)

        return await idempotent(self.deps, tenant, request.request_id, pb.AnalysisBatch, create)

    async def GetBatch(self, request: pb.GetBatchRequest, context: Context) -> pb.AnalysisBatch:
        organization_id, batch_id = authorize(names.BATCH, request.name)
        tenant = Tenant.of(organization_id)

        async def load() -> pb.AnalysisBatch:
            async with cr.primary_read(self.deps, tenant) as session:
                view = await BatchesRepository(session, tenant).get_batch(batch_id)
                return cv.batch_to_proto(view)

        # Under the analyses generation: the progress is derived from the members.
        return await cr.cached_get(
            self.deps,
            cr.BATCH,
            organization_id,
            batch_id,
            pb.AnalysisBatch,
            load,
            generation=cr.analyses_generation(organization_id),
        )

    async def ListBatches(
        self, request: pb.ListBatchesRequest, context: Context
    ) -> pb.ListBatchesResponse:
        _, tenant = _parent(request.parent)
        v = Violations()
        start, end = cv.time_range(v, request, request, "create_time_range")
        with v.collect():
            batches_repo.order_keys(request.order_by)
        v.raise_if_any()
        page_req = page_request(
            self.deps, request, request.parent, start, end, request.order_by, request.show_deleted
        )
        filter = BatchFilter(
            create_time_from=start, create_time_to=end, show_deleted=request.show_deleted
        )
        async with transaction(self.deps, tenant, read_only=True) as session:
            page = await BatchesRepository(session, tenant).list(
                filter,
                page_size=page_req.page_size,
                cursor=page_req.cursor,
                order_by=request.order_by,
                include_total=True,
            )
        filled = page_req.fill(page, cv.batch_to_proto)
        return pb.ListBatchesResponse(
            batches=filled.items,
            next_page_token=filled.next_page_token,
            total_size=page.total_size or 0,
        )

    async def UpdateBatch(
        self, request: pb.UpdateBatchRequest, context: Context
    ) -> pb.AnalysisBatch:
        organization_id, batch_id = authorize(names.BATCH, request.batch.name, "batch.name")
        tenant = Tenant.of(organization_id)
        v = Violations()
        batch = request.batch
        paths = v.call(lambda: resolve_update_mask(request.update_mask, batch, BATCH_MUTABLE_PATHS))
        changes = {path: getattr(batch, path) for path in sorted(paths or ())}
        v.extend(batch_violations(changes, "batch."))
        version = v.call(lambda: expected_version(batch.etag, "batch.etag"))
        v.raise_if_any()
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.versioned_entity(cr.BATCH, cr.analyses_generation(organization_id), batch_id)
            stale.changed(feed.BATCH, organization_id, batch_id)
            view = await BatchesRepository(session, tenant).update(
                batch_id, changes, expected_version=version, update_by=caller_subject()
            )
            return cv.batch_to_proto(view)

    async def DeleteBatch(
        self, request: pb.DeleteBatchRequest, context: Context
    ) -> pb.AnalysisBatch:
        organization_id, batch_id = authorize(names.BATCH, request.name)
        tenant = Tenant.of(organization_id)
        version = expected_version(request.etag)
        # Members keep their batch: the statistics do not move, only the batch's entry.
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.versioned_entity(cr.BATCH, cr.analyses_generation(organization_id), batch_id)
            stale.changed(feed.BATCH, organization_id, batch_id)
            batches = BatchesRepository(session, tenant)
            view = await batches.view(
                await batches.soft_delete(
                    batch_id, expected_version=version, delete_by=caller_subject()
                )
            )
            return cv.batch_to_proto(view)

    async def UndeleteBatch(
        self, request: pb.UndeleteBatchRequest, context: Context
    ) -> pb.AnalysisBatch:
        organization_id, batch_id = authorize(names.BATCH, request.name)
        tenant = Tenant.of(organization_id)
        async with cr.write_transaction(self.deps, tenant) as (session, stale):
            stale.versioned_entity(cr.BATCH, cr.analyses_generation(organization_id), batch_id)
            stale.changed(feed.BATCH, organization_id, batch_id)
            batches = BatchesRepository(session, tenant)
            view = await batches.view(await batches.undelete(batch_id, update_by=caller_subject()))
            return cv.batch_to_proto(view)

    # --- model performance ------------------------------------------------------------
    async def CreateModelPerformance(
        self, request: pb.CreateModelPerformanceRequest, context: Context
    ) -> pb.ModelPerformance:
        _, tenant = _parent(request.parent)
        v = Violations()
        new = cv.new_model_performance(v, request.model_performance, "model_performance.")
        record_id = cv.optional_id(v, request.model_performance_id, "model_performance_id")
        _request_id(v, request.request_id)
        v.raise_if_any()
        assert new is not None
        subject = caller_subject()

        async def create(session: AsyncSession) -> pb.ModelPerformance:
            row = await ModelPerformanceRepository(session, tenant).create(
                new, create_by=subject, record_id=record_id
            )
            return cv.model_performance_to_proto(row)

        return await idempotent(self.deps, tenant, request.request_id, pb.ModelPerformance, create)

    async def ListModelPerformances(
        self, request: pb.ListModelPerformancesRequest, context: Context
    ) -> pb.ListModelPerformancesResponse:
        _, tenant = _parent(request.parent)
        v = Violations()
        start, end = cv.time_range(v, request, request, "window_time_range")
        with v.collect():
            mp_repo.order_keys(request.order_by)
        v.raise_if_any()
        page_req = page_request(
            self.deps,
            request,
            request.parent,
            request.model_name,
            request.model_version,
            start,
            end,
            request.order_by,
        )
        filter = ModelPerformanceFilter(
            model_name=request.model_name or None,
            model_version=request.model_version or None,
            window_start_from=start,
            window_start_to=end,
        )
        async with transaction(self.deps, tenant, read_only=True) as session:
            page = await ModelPerformanceRepository(session, tenant).list(
                filter,
                page_size=page_req.page_size,
                cursor=page_req.cursor,
                order_by=request.order_by,
                include_total=True,
            )
        filled = page_req.fill(page, cv.model_performance_to_proto)
        return pb.ListModelPerformancesResponse(
            model_performances=filled.items,
            next_page_token=filled.next_page_token,
            total_size=page.total_size or 0,
        )

    # --- statistics -------------------------------------------------------------------
    async def GetAnalysisStatistics(
        self, request: pb.GetAnalysisStatisticsRequest, context: Context
    ) -> pb.AnalysisStatistics:
        organization_id, tenant = _parent(request.parent)
        v = Violations()
        start, end = cv.time_range(v, request, request, "create_time_range")
        filter = AnalysisFilter(
            analysis_type=cv.analysis_type(
                v, request.analysis_type, "analysis_type", required=False
            ),
            batch_id=cv.batch_id_in(v, request.batch, organization_id, "batch"),
            model_used=request.model_used or None,
            create_time_from=start,
            create_time_to=end,
        )
        v.raise_if_any()

        async def load() -> pb.AnalysisStatistics:
            async with cr.primary_read(self.deps, tenant) as session:
                stats = await AnalysesRepository(session, tenant).statistics(filter)
            return _statistics_to_proto(stats)

        return await cr.cached_statistics(
            self.deps,
            cr.ANALYSIS_STATISTICS,
            cr.analyses_generation(organization_id),
            request,
            pb.AnalysisStatistics,
            load,
        )

    # --- watches (server/services/watches.py) -----------------------------------------
    async def WatchAnalysis(
        self, request: pb.WatchAnalysisRequest, context: Context
    ) -> AsyncIterator[pb.Analysis]:
        organization_id, analysis_id = authorize(names.ANALYSIS, request.name)
        tenant = Tenant.of(organization_id)

        async def read() -> pb.Analysis:
            # The primary, past the cache: the state must be the committed one.
            record = await read_analysis_record(
                primary_point_reader(self.deps, tenant), analysis_id
            )
            return cv.analysis_to_proto(cast(TextAnalysis, record))

        async for state in watches.watch(
            self.deps, organization_id, (feed.ANALYSIS,), analysis_id, read, _analysis_final
        ):
            yield state

    async def WatchBatch(
        self, request: pb.WatchBatchRequest, context: Context
    ) -> AsyncIterator[pb.AnalysisBatch]:
        organization_id, batch_id = authorize(names.BATCH, request.name)
        tenant = Tenant.of(organization_id)

        async def read() -> pb.AnalysisBatch:
            async with cr.primary_read(self.deps, tenant) as session:
                return cv.batch_to_proto(
                    await BatchesRepository(session, tenant).get_batch(batch_id)
                )

        # Any analysis change of the organization may move a member in or out of the batch.
        async for state in watches.watch(
            self.deps, organization_id, (feed.ANALYSIS, feed.BATCH), None, read, _batch_final
        ):
            yield state

    @staticmethod
    def _analysis_written(
        stale: cr.Invalidation, organization_id: uuid.UUID, analysis_id: uuid.UUID
    ) -> None:
        """An analysis changed: its entry, the statistics and every batch's progress (it
        may have left one batch for another) go stale."""
        stale.entity(cr.ANALYSIS, organization_id, analysis_id)
        stale.bump(cr.analyses_generation(organization_id))
        stale.changed(feed.ANALYSIS, organization_id, analysis_id)


def _analysis_final(analysis: pb.Analysis) -> bool:
    return analysis.state in (pb.ANALYSIS_STATE_COMPLETED, pb.ANALYSIS_STATE_FAILED)


def _batch_final(batch: pb.AnalysisBatch) -> bool:
    """Every live member terminal; an empty batch may still receive members."""
    return batch.state in (pb.BATCH_STATE_COMPLETED, pb.BATCH_STATE_COMPLETED_WITH_FAILURES)


def _statistics_to_proto(stats: AnalysisStatistics) -> pb.AnalysisStatistics:
    out = pb.AnalysisStatistics(
        total_count=stats.total,
        # Enum order, non-zero counts only.
        type_counts=[
            pb.AnalysisTypeCount(
                analysis_type=enum_to_proto(pb.AnalysisType, t),
                count=stats.by_type[t],
            )
            for t in AnalysisType
            if stats.by_type.get(t)
        ],
        state_counts=[
            pb.AnalysisStateCount(
                state=enum_to_proto(pb.AnalysisState, s),
                count=stats.by_state[s],
            )
            for s in AnalysisState
            if stats.by_state.get(s)
        ],
    )
    for model in stats.by_model:
        entry = out.model_statistics.add(model_used=model.model_used or "", count=model.count)
        set_duration_ms(entry.mean_processing_duration, model.mean_processing_ms)
    set_duration_ms(out.mean_processing_duration, stats.mean_processing_ms)
    return out


def add_to_server(server: grpc.aio.Server, deps: Dependencies) -> str:
    analysis_service_pb2_grpc.add_AnalysisServiceServicer_to_server(AnalysisServicer(deps), server)
    return SERVICE_NAME
