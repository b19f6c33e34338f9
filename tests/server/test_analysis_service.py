"""AnalysisService end to end: the real server, called only through the client package."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.rpc import error_details_pb2

from db.engine import Database
from db.repositories.organizations import OrganizationsRepository
from db.tenancy import Tenant
from ferrule.client import (
    Aborted,
    AlreadyExists,
    AsyncFerruleClient,
    FailedPrecondition,
    FerruleError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    aiterate_items,
)
from ferrule.v1 import analysis_service_pb2 as pb
from ferrule.v1 import common_pb2
from tests.server.conftest import RunningServer

SENTIMENT = pb.ANALYSIS_TYPE_SENTIMENT
QUALITY = pb.ANALYSIS_TYPE_QUALITY


@dataclass
class Org:
    id: uuid.UUID
    parent: str
    client: AsyncFerruleClient


async def _organizations(server: RunningServer, count: int) -> list[uuid.UUID]:
    """Organizations inserted directly: the tenant rows are not this service's concern."""
    database = Database.from_url(server.database_url)
    try:
        async with database.transaction(Tenant.all()) as session:
            repo = OrganizationsRepository(session, Tenant.all())
            return [(await repo.create(f"org {i}")).id for i in range(count)]
    finally:
        await database.dispose()


async def _org(server: RunningServer, **token: str) -> Org:
    (org_id,) = await _organizations(server, 1)
    return Org(org_id, f"organizations/{org_id}", server.for_org(org_id, **token))


@pytest.fixture
async def org(db_server: RunningServer) -> Org:
    return await _org(db_server, subject="svc-analyst")


def analysis(text: str, kind: int = SENTIMENT, **fields: object) -> pb.Analysis:
    return pb.Analysis(text=text, analysis_type=kind, **fields)  # type: ignore[arg-type]


async def create(org: Org, text: str, kind: int = SENTIMENT, **fields: object) -> pb.Analysis:
    return await org.client.analyses.CreateAnalysis(
        pb.CreateAnalysisRequest(parent=org.parent, analysis=analysis(text, kind, **fields))
    )


async def set_state(org: Org, name: str, state: int, **fields: object) -> pb.Analysis:
    paths = ["state", *fields]
    return await org.client.analyses.UpdateAnalysis(
        pb.UpdateAnalysisRequest(
            analysis=pb.Analysis(name=name, state=state, **fields),  # type: ignore[arg-type]
            update_mask=field_mask_pb2.FieldMask(paths=paths),
        )
    )


def violations(exc: InvalidArgument) -> set[str]:
    return {field for field, _ in exc.field_violations}


def assert_ferrule_error(exc: FerruleError, reason: str) -> None:
    assert exc.reason == reason
    assert exc.domain == "ferrule"


def duration_ms(ms: int) -> Duration:
    value = Duration()
    value.FromMilliseconds(ms)
    return value


def timestamp(value: datetime) -> Timestamp:
    out = Timestamp()
    out.FromDatetime(value)
    return out


# --- create, dedup, idempotency ---------------------------------------------------------
async def test_create_get_dedup_and_retried_request_id(any_server: RunningServer) -> None:
    org = await _org(any_server, subject="svc-analyst")
    first = await create(org, "I love it", optimization_tier=pb.OPTIMIZATION_TIER_FAST)
    assert first.name.startswith(org.parent + "/analyses/")
    assert first.content_hash == hashlib.sha256(b"I love it").hexdigest()
    assert first.state == pb.ANALYSIS_STATE_PENDING
    assert first.optimization_tier == pb.OPTIMIZATION_TIER_FAST
    assert not first.deduplicated
    assert first.create_by == "svc-analyst"
    assert first.etag

    again = await create(org, "I love it")
    assert again.deduplicated
    assert again.name == first.name
    other_type = await create(org, "I love it", QUALITY)
    assert not other_type.deduplicated

    fetched = await org.client.analyses.GetAnalysis(pb.GetAnalysisRequest(name=first.name))
    assert not fetched.deduplicated
    assert fetched.text == "I love it"

    request = pb.CreateAnalysisRequest(
        parent=org.parent, analysis=analysis("retried"), request_id=str(uuid.uuid4())
    )
    one = await org.client.analyses.CreateAnalysis(request)
    two = await org.client.analyses.CreateAnalysis(request)
    assert one == two
    assert not two.deduplicated  # the first response, replayed
    listed = await org.client.analyses.ListAnalyses(pb.ListAnalysesRequest(parent=org.parent))
    assert listed.total_size == 3


async def test_create_errors(org: Org) -> None:
    with pytest.raises(InvalidArgument) as caught:
        await org.client.analyses.CreateAnalysis(
            pb.CreateAnalysisRequest(
                parent=org.parent,
                analysis=pb.Analysis(
                    text="",
                    sentiment_score=2.0,
                    state=pb.ANALYSIS_STATE_COMPLETED,
                    emotion_scores={"Joy": 0.5},
                ),
                analysis_id="not-a-uuid",
            )
        )
    assert violations(caught.value) == {
        "analysis.text",
        "analysis.analysis_type",
        "analysis.sentiment_score",
        "analysis.state",
        "analysis.emotion_scores",
        "analysis_id",
    }
    assert_ferrule_error(caught.value, "INVALID_ARGUMENT")

    missing_batch = f"{org.parent}/batches/{uuid.uuid4()}"
    with pytest.raises(NotFound) as not_found:
        await create(org, "x", batch=missing_batch)
    resource = not_found.value.detail(error_details_pb2.ResourceInfo)
    assert resource is not None
    assert resource.resource_name == missing_batch

    existing = await create(org, "first")
    with pytest.raises(AlreadyExists):
        await org.client.analyses.CreateAnalysis(
            pb.CreateAnalysisRequest(
                parent=org.parent,
                analysis=analysis("second"),
                analysis_id=existing.name.rsplit("/", 1)[1],
            )
        )
    with pytest.raises(InvalidArgument) as bad_parent:
        await org.client.analyses.CreateAnalysis(
            pb.CreateAnalysisRequest(parent="orgs/x", analysis=analysis("y"))
        )
    assert violations(bad_parent.value) == {"parent"}


# --- update: state machine, etags, masks --------------------------------------------------
async def test_update_state_machine_and_etags(org: Org) -> None:
    created = await create(org, "to process")
    with pytest.raises(FailedPrecondition) as illegal:
        await set_state(org, created.name, pb.ANALYSIS_STATE_COMPLETED)
    assert_ferrule_error(illegal.value, "INVALID_STATE_TRANSITION")
    assert illegal.value.metadata == {"from_state": "PENDING", "to_state": "COMPLETED"}

    same = await set_state(org, created.name, pb.ANALYSIS_STATE_PENDING)  # no-op
    assert same.etag == created.etag

    processing = await set_state(org, created.name, pb.ANALYSIS_STATE_PROCESSING)
    assert processing.etag != created.etag
    with pytest.raises(Aborted) as stale:
        await org.client.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(
                    name=created.name, state=pb.ANALYSIS_STATE_COMPLETED, etag=created.etag
                ),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
    assert_ferrule_error(stale.value, "ETAG_MISMATCH")

    result = pb.Analysis(
        name=created.name,
        state=pb.ANALYSIS_STATE_COMPLETED,
        sentiment_score=0.75,
        emotion_scores={"joy": 0.9},
        processing_duration=duration_ms(120),
        model_used="roberta@2",
        etag=processing.etag,
    )
    result.result.update({"tokens": 3})
    completed = await org.client.analyses.UpdateAnalysis(
        pb.UpdateAnalysisRequest(analysis=result)  # empty mask: every populated field
    )
    assert completed.state == pb.ANALYSIS_STATE_COMPLETED
    assert completed.sentiment_score == 0.75
    assert dict(completed.emotion_scores) == {"joy": pytest.approx(0.9)}
    assert completed.processing_duration.ToMilliseconds() == 120
    assert completed.result["tokens"] == 3
    assert completed.update_by == "svc-analyst"

    with pytest.raises(FailedPrecondition) as terminal:
        await org.client.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, quality_score=0.5),
                update_mask=field_mask_pb2.FieldMask(paths=["quality_score"]),
            )
        )
    assert_ferrule_error(terminal.value, "FAILED_PRECONDITION")
    # Only moving between batches is allowed once terminal.
    batch = await org.client.analyses.CreateBatch(
        pb.CreateBatchRequest(parent=org.parent, batch=pb.AnalysisBatch(display_name="late"))
    )
    moved = await org.client.analyses.UpdateAnalysis(
        pb.UpdateAnalysisRequest(
            analysis=pb.Analysis(name=created.name, batch=batch.name),
            update_mask=field_mask_pb2.FieldMask(paths=["batch"]),
        )
    )
    assert moved.batch == batch.name

    with pytest.raises(InvalidArgument) as immutable:
        await org.client.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, text="new"),
                update_mask=field_mask_pb2.FieldMask(paths=["text", "content_hash"]),
            )
        )
    assert violations(immutable.value) == {"update_mask"}
    with pytest.raises(InvalidArgument) as out_of_range:
        await org.client.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(
                analysis=pb.Analysis(name=created.name, quality_score=1.5),
                update_mask=field_mask_pb2.FieldMask(paths=["quality_score"]),
            )
        )
    assert violations(out_of_range.value) == {"analysis.quality_score"}
    with pytest.raises(NotFound):
        await set_state(org, f"{org.parent}/analyses/{uuid.uuid4()}", pb.ANALYSIS_STATE_FAILED)


async def test_delete_and_undelete_analysis(org: Org) -> None:
    created = await create(org, "short-lived")
    updated = await set_state(org, created.name, pb.ANALYSIS_STATE_PROCESSING)
    with pytest.raises(Aborted):
        await org.client.analyses.DeleteAnalysis(
            pb.DeleteAnalysisRequest(name=created.name, etag=created.etag)
        )
    deleted = await org.client.analyses.DeleteAnalysis(
        pb.DeleteAnalysisRequest(name=created.name, etag=updated.etag)
    )
    assert deleted.HasField("delete_time")
    assert deleted.delete_by == "svc-analyst"
    fetched = await org.client.analyses.GetAnalysis(pb.GetAnalysisRequest(name=created.name))
    assert fetched.HasField("delete_time")
    hidden = await org.client.analyses.ListAnalyses(pb.ListAnalysesRequest(parent=org.parent))
    assert hidden.total_size == 0
    shown = await org.client.analyses.ListAnalyses(
        pb.ListAnalysesRequest(parent=org.parent, show_deleted=True)
    )
    assert [a.name for a in shown.analyses] == [created.name]
    with pytest.raises(NotFound):
        await org.client.analyses.DeleteAnalysis(pb.DeleteAnalysisRequest(name=created.name))
    with pytest.raises(NotFound):
        await set_state(org, created.name, pb.ANALYSIS_STATE_COMPLETED)

    restored = await org.client.analyses.UndeleteAnalysis(
        pb.UndeleteAnalysisRequest(name=created.name)
    )
    assert not restored.HasField("delete_time")
    with pytest.raises(AlreadyExists):
        await org.client.analyses.UndeleteAnalysis(pb.UndeleteAnalysisRequest(name=created.name))
    # While deleted, the same text can be created anew; then the undelete conflicts.
    await org.client.analyses.DeleteAnalysis(pb.DeleteAnalysisRequest(name=created.name))
    replacement = await create(org, "short-lived")
    assert not replacement.deduplicated
    with pytest.raises(AlreadyExists):
        await org.client.analyses.UndeleteAnalysis(pb.UndeleteAnalysisRequest(name=created.name))


# --- bulk create ---------------------------------------------------------------------------
async def test_batch_create_analyses(org: Org) -> None:
    batch = await org.client.analyses.CreateBatch(
        pb.CreateBatchRequest(parent=org.parent, batch=pb.AnalysisBatch(display_name="bulk"))
    )
    existing = await create(org, "already here")

    def child(text: str, **fields: str) -> pb.CreateAnalysisRequest:
        return pb.CreateAnalysisRequest(analysis=analysis(text, SENTIMENT, **fields))

    request = pb.BatchCreateAnalysesRequest(
        parent=org.parent,
        batch=batch.name,
        request_id=str(uuid.uuid4()),
        requests=[child("a"), child("already here"), child("a"), child("b")],
    )
    response = await org.client.analyses.BatchCreateAnalyses(request)
    flags = [a.deduplicated for a in response.analyses]
    assert flags == [False, True, True, False]
    assert response.analyses[1].name == existing.name
    assert response.analyses[1].batch == ""  # deduplicated: returned as is, not moved
    assert response.analyses[2].name == response.analyses[0].name
    assert response.analyses[0].batch == batch.name
    assert await org.client.analyses.BatchCreateAnalyses(request) == response

    with pytest.raises(InvalidArgument) as invalid:
        await org.client.analyses.BatchCreateAnalyses(
            pb.BatchCreateAnalysesRequest(
                parent=org.parent,
                batch=batch.name,
                requests=[
                    child("fine"),
                    child(""),
                    pb.CreateAnalysisRequest(parent="organizations/other", analysis=analysis("p")),
                    child("q", batch=f"{org.parent}/batches/{uuid.uuid4()}"),
                ],
            )
        )
    assert violations(invalid.value) == {
        "requests[1].analysis.text",
        "requests[2].parent",
        "requests[3].analysis.batch",
    }
    with pytest.raises(InvalidArgument) as too_many:
        await org.client.analyses.BatchCreateAnalyses(
            pb.BatchCreateAnalysesRequest(
                parent=org.parent, requests=[child(f"t{i}") for i in range(1001)]
            )
        )
    assert "requests" in violations(too_many.value)
    with pytest.raises(AlreadyExists):  # atomic: "fresh" is not written either
        await org.client.analyses.BatchCreateAnalyses(
            pb.BatchCreateAnalysesRequest(
                parent=org.parent,
                requests=[
                    child("fresh"),
                    pb.CreateAnalysisRequest(
                        analysis=analysis("dup id"), analysis_id=existing.name.rsplit("/", 1)[1]
                    ),
                ],
            )
        )
    listed = await org.client.analyses.ListAnalyses(pb.ListAnalysesRequest(parent=org.parent))
    assert listed.total_size == 3  # "already here", "a", "b"


# --- batches -------------------------------------------------------------------------------
async def test_batches_crud_and_derived_progress(org: Org) -> None:
    batch = await org.client.analyses.CreateBatch(
        pb.CreateBatchRequest(
            parent=org.parent,
            batch=pb.AnalysisBatch(display_name="nightly", description="d"),
            batch_id=str(uuid.uuid4()),
        )
    )
    assert batch.state == pb.BATCH_STATE_EMPTY
    assert batch.progress.total_count == 0
    members = [(await create(org, f"m{i}", batch=batch.name)).name for i in range(3)]
    await set_state(org, members[0], pb.ANALYSIS_STATE_PROCESSING)
    await set_state(
        org, members[0], pb.ANALYSIS_STATE_COMPLETED, processing_duration=duration_ms(100)
    )
    await set_state(org, members[1], pb.ANALYSIS_STATE_PROCESSING)
    got = await org.client.analyses.GetBatch(pb.GetBatchRequest(name=batch.name))
    assert got.state == pb.BATCH_STATE_PROCESSING
    progress = got.progress
    assert (progress.total_count, progress.pending_count, progress.processing_count) == (3, 1, 1)
    assert (progress.completed_count, progress.failed_count) == (1, 0)
    assert progress.mean_processing_duration.ToMilliseconds() == 100
    assert got.etag == batch.etag  # member changes do not touch the batch's etag

    await set_state(org, members[1], pb.ANALYSIS_STATE_FAILED, error_message="oom")
    await org.client.analyses.DeleteAnalysis(pb.DeleteAnalysisRequest(name=members[2]))
    got = await org.client.analyses.GetBatch(pb.GetBatchRequest(name=batch.name))
    assert got.state == pb.BATCH_STATE_COMPLETED_WITH_FAILURES
    assert got.progress.total_count == 2

    with pytest.raises(AlreadyExists):
        await org.client.analyses.CreateBatch(
            pb.CreateBatchRequest(
                parent=org.parent,
                batch=pb.AnalysisBatch(display_name="again"),
                batch_id=batch.name.rsplit("/", 1)[1],
            )
        )
    with pytest.raises(InvalidArgument) as invalid:
        await org.client.analyses.CreateBatch(
            pb.CreateBatchRequest(parent=org.parent, batch=pb.AnalysisBatch(display_name=" "))
        )
    assert violations(invalid.value) == {"batch.display_name"}

    renamed = await org.client.analyses.UpdateBatch(
        pb.UpdateBatchRequest(
            batch=pb.AnalysisBatch(name=batch.name, display_name="renamed", etag=batch.etag),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]),
        )
    )
    assert renamed.display_name == "renamed"
    assert renamed.description == "d"
    assert renamed.progress.total_count == 2
    with pytest.raises(Aborted):
        await org.client.analyses.UpdateBatch(
            pb.UpdateBatchRequest(
                batch=pb.AnalysisBatch(name=batch.name, display_name="x", etag=batch.etag)
            )
        )
    with pytest.raises(InvalidArgument):
        await org.client.analyses.UpdateBatch(
            pb.UpdateBatchRequest(
                batch=pb.AnalysisBatch(name=batch.name),
                update_mask=field_mask_pb2.FieldMask(paths=["state"]),
            )
        )
    deleted = await org.client.analyses.DeleteBatch(pb.DeleteBatchRequest(name=batch.name))
    assert deleted.HasField("delete_time")
    with pytest.raises(NotFound):  # a deleted batch takes no new members
        await create(org, "late member", batch=batch.name)
    restored = await org.client.analyses.UndeleteBatch(pb.UndeleteBatchRequest(name=batch.name))
    assert not restored.HasField("delete_time")
    with pytest.raises(AlreadyExists):
        await org.client.analyses.UndeleteBatch(pb.UndeleteBatchRequest(name=batch.name))
    with pytest.raises(NotFound):
        await org.client.analyses.GetBatch(
            pb.GetBatchRequest(name=f"{org.parent}/batches/{uuid.uuid4()}")
        )


async def test_list_batches_pages_with_progress(org: Org) -> None:
    names = []
    for i in range(5):
        batch = await org.client.analyses.CreateBatch(
            pb.CreateBatchRequest(
                parent=org.parent, batch=pb.AnalysisBatch(display_name=f"batch {i}")
            )
        )
        names.append(batch.name)
    await create(org, "member", batch=names[3])
    request = pb.ListBatchesRequest(parent=org.parent, page_size=2, order_by="display_name")
    seen = [b async for b in aiterate_items(org.client.analyses.ListBatches, request, "batches")]
    assert [b.name for b in seen] == names
    assert [b.progress.total_count for b in seen] == [0, 0, 0, 1, 0]
    assert seen[3].state == pb.BATCH_STATE_PENDING
    first = await org.client.analyses.ListBatches(request)
    assert first.total_size == 5
    with pytest.raises(InvalidArgument) as reused:
        await org.client.analyses.ListBatches(
            pb.ListBatchesRequest(
                parent=org.parent, page_size=2, page_token=first.next_page_token
            )  # another order_by: another query
        )
    assert violations(reused.value) == {"page_token"}
    with pytest.raises(InvalidArgument) as bad_order:
        await org.client.analyses.ListBatches(
            pb.ListBatchesRequest(parent=org.parent, order_by="progress")
        )
    assert violations(bad_order.value) == {"order_by"}


# --- list analyses ---------------------------------------------------------------------------
async def test_list_analyses_filters_and_pages(org: Org) -> None:
    names = [
        (await create(org, f"text {i}", SENTIMENT if i % 2 else QUALITY)).name for i in range(6)
    ]
    await set_state(org, names[0], pb.ANALYSIS_STATE_PROCESSING, model_used="m1")
    request = pb.ListAnalysesRequest(parent=org.parent, page_size=4, order_by="create_time")
    seen = [
        a.name async for a in aiterate_items(org.client.analyses.ListAnalyses, request, "analyses")
    ]
    assert seen == names
    newest_first = await org.client.analyses.ListAnalyses(pb.ListAnalysesRequest(parent=org.parent))
    assert [a.name for a in newest_first.analyses] == list(reversed(names))

    async def names_of(**filters: object) -> list[str]:
        response = await org.client.analyses.ListAnalyses(
            pb.ListAnalysesRequest(parent=org.parent, order_by="create_time", **filters)  # type: ignore[arg-type]
        )
        return [a.name for a in response.analyses]

    assert await names_of(analysis_type=SENTIMENT) == names[1::2]
    assert await names_of(state=pb.ANALYSIS_STATE_PROCESSING) == [names[0]]
    assert await names_of(model_used="m1") == [names[0]]
    future = datetime.now(UTC) + timedelta(days=1)
    assert (
        await names_of(create_time_range=common_pb2.TimeRange(start_time=timestamp(future))) == []
    )

    with pytest.raises(InvalidArgument) as invalid:
        await org.client.analyses.ListAnalyses(
            pb.ListAnalysesRequest(
                parent=org.parent,
                page_size=-1,
                order_by="text",
                create_time_range=common_pb2.TimeRange(
                    start_time=timestamp(future), end_time=timestamp(future - timedelta(1))
                ),
            )
        )
    assert {"order_by", "create_time_range.end_time"} <= violations(invalid.value)


# --- model performance ---------------------------------------------------------------------
async def test_model_performance_records(org: Org) -> None:
    start = datetime(2025, 3, 1, tzinfo=UTC)

    def record(day: int, model: str = "bert") -> pb.ModelPerformance:
        return pb.ModelPerformance(
            model_name=model,
            model_version="1.0",
            window_start_time=timestamp(start + timedelta(days=day)),
            window_end_time=timestamp(start + timedelta(days=day + 1)),
            accuracy=0.9,
            f1_score=0.8,
            mean_latency=duration_ms(12),
            request_count=100,
            error_count=2,
        )

    created = []
    for day, model in ((0, "bert"), (1, "bert"), (2, "gpt")):
        created.append(
            await org.client.analyses.CreateModelPerformance(
                pb.CreateModelPerformanceRequest(
                    parent=org.parent, model_performance=record(day, model)
                )
            )
        )
    first = created[0]
    assert first.name.startswith(org.parent + "/modelPerformances/")
    assert first.accuracy == pytest.approx(0.9)
    assert not first.HasField("precision")
    assert first.mean_latency.ToMilliseconds() == 12
    assert first.create_by == "svc-analyst"

    bad = record(0)
    bad.window_end_time.CopyFrom(timestamp(start - timedelta(days=1)))
    bad.recall = 1.5
    bad.error_count = 101
    with pytest.raises(InvalidArgument) as invalid:
        await org.client.analyses.CreateModelPerformance(
            pb.CreateModelPerformanceRequest(parent=org.parent, model_performance=bad)
        )
    assert violations(invalid.value) == {
        "model_performance.window_end_time",
        "model_performance.recall",
        "model_performance.error_count",
    }
    record_id = str(uuid.uuid4())
    await org.client.analyses.CreateModelPerformance(
        pb.CreateModelPerformanceRequest(
            parent=org.parent, model_performance=record(5, "t5"), model_performance_id=record_id
        )
    )
    with pytest.raises(AlreadyExists):
        await org.client.analyses.CreateModelPerformance(
            pb.CreateModelPerformanceRequest(
                parent=org.parent, model_performance=record(6, "t5"), model_performance_id=record_id
            )
        )

    bert = await org.client.analyses.ListModelPerformances(
        pb.ListModelPerformancesRequest(parent=org.parent, model_name="bert")
    )
    assert [r.name for r in bert.model_performances] == [created[1].name, created[0].name]
    assert bert.total_size == 2
    window = await org.client.analyses.ListModelPerformances(
        pb.ListModelPerformancesRequest(
            parent=org.parent,
            order_by="window_start_time",
            window_time_range=common_pb2.TimeRange(
                start_time=timestamp(start + timedelta(days=1)),
                end_time=timestamp(start + timedelta(days=3)),
            ),
        )
    )
    assert [r.name for r in window.model_performances] == [created[1].name, created[2].name]


# --- statistics ----------------------------------------------------------------------------
async def test_statistics_match_hand_computed_values(org: Org) -> None:
    # sentiment: a (COMPLETED, m1, 100 ms), b (COMPLETED, m1, 300 ms), c (PENDING);
    # quality: d (FAILED, m2, 50 ms); e deleted (excluded).
    s = [(await create(org, t)).name for t in ("a", "b", "c")]
    d = (await create(org, "d", QUALITY)).name
    e = (await create(org, "e")).name
    for name, ms in ((s[0], 100), (s[1], 300)):
        await set_state(org, name, pb.ANALYSIS_STATE_PROCESSING)
        await set_state(
            org,
            name,
            pb.ANALYSIS_STATE_COMPLETED,
            processing_duration=duration_ms(ms),
            model_used="m1",
        )
    await set_state(
        org, d, pb.ANALYSIS_STATE_FAILED, processing_duration=duration_ms(50), model_used="m2"
    )
    await org.client.analyses.DeleteAnalysis(pb.DeleteAnalysisRequest(name=e))

    stats = await org.client.analyses.GetAnalysisStatistics(
        pb.GetAnalysisStatisticsRequest(parent=org.parent)
    )
    assert stats.total_count == 4
    assert [(c.analysis_type, c.count) for c in stats.type_counts] == [(SENTIMENT, 3), (QUALITY, 1)]
    assert [(c.state, c.count) for c in stats.state_counts] == [
        (pb.ANALYSIS_STATE_PENDING, 1),
        (pb.ANALYSIS_STATE_COMPLETED, 2),
        (pb.ANALYSIS_STATE_FAILED, 1),
    ]
    models = [
        (
            m.model_used,
            m.count,
            m.mean_processing_duration.ToMilliseconds(),
            m.HasField("mean_processing_duration"),
        )
        for m in stats.model_statistics
    ]
    assert models == [("m1", 2, 200, True), ("", 1, 0, False), ("m2", 1, 50, True)]
    assert stats.mean_processing_duration.ToMilliseconds() == 150

    sentiment = await org.client.analyses.GetAnalysisStatistics(
        pb.GetAnalysisStatisticsRequest(parent=org.parent, analysis_type=SENTIMENT, model_used="m1")
    )
    assert sentiment.total_count == 2
    assert sentiment.mean_processing_duration.ToMilliseconds() == 200


# --- tenancy and scopes --------------------------------------------------------------------
async def test_other_tenant_and_read_scope_are_refused(pg_server: RunningServer) -> None:
    org_a = await _org(pg_server)
    org_b = await _org(pg_server)
    target = await create(org_a, "secret")
    batch = await org_a.client.analyses.CreateBatch(
        pb.CreateBatchRequest(parent=org_a.parent, batch=pb.AnalysisBatch(display_name="a"))
    )
    intruder = org_b.client.analyses
    calls: Sequence[Callable[[], Awaitable[object]]] = (
        lambda: intruder.GetAnalysis(pb.GetAnalysisRequest(name=target.name)),
        lambda: intruder.GetAnalysis(
            pb.GetAnalysisRequest(name=f"{org_a.parent}/analyses/{uuid.uuid4()}")
        ),
        lambda: intruder.ListAnalyses(pb.ListAnalysesRequest(parent=org_a.parent)),
        lambda: intruder.CreateAnalysis(
            pb.CreateAnalysisRequest(parent=org_a.parent, analysis=analysis("x"))
        ),
        lambda: intruder.DeleteAnalysis(pb.DeleteAnalysisRequest(name=target.name)),
        lambda: intruder.UpdateAnalysis(
            pb.UpdateAnalysisRequest(analysis=pb.Analysis(name=target.name, model_used="x"))
        ),
        lambda: intruder.GetBatch(pb.GetBatchRequest(name=batch.name)),
        lambda: intruder.GetAnalysisStatistics(
            pb.GetAnalysisStatisticsRequest(parent=org_a.parent)
        ),
        lambda: intruder.ListModelPerformances(
            pb.ListModelPerformancesRequest(parent=org_a.parent)
        ),
    )
    for call in calls:
        with pytest.raises(PermissionDenied) as denied:
            await call()
        assert_ferrule_error(denied.value, "ORGANIZATION_MISMATCH")
    # Org B's own list never shows org A's rows.
    own = await intruder.ListAnalyses(pb.ListAnalysesRequest(parent=org_b.parent))
    assert own.total_size == 0
    # Org A's batch cannot be used from org B's parent either.
    with pytest.raises(InvalidArgument):
        await create(org_b, "y", batch=batch.name)

    reader = pg_server.for_org(org_a.id, scope="read")
    assert (await reader.analyses.GetAnalysis(pb.GetAnalysisRequest(name=target.name))).name
    with pytest.raises(PermissionDenied) as read_only:
        await reader.analyses.CreateAnalysis(
            pb.CreateAnalysisRequest(parent=org_a.parent, analysis=analysis("z"))
        )
    assert_ferrule_error(read_only.value, "MISSING_SCOPE")
    with pytest.raises(PermissionDenied):
        await reader.analyses.UpdateAnalysis(
            pb.UpdateAnalysisRequest(analysis=pb.Analysis(name=target.name, model_used="x"))
        )
