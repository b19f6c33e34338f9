"""Analyses, batches and model performance repositories on PostgreSQL (under RLS) and SQLite.

Fixtures (`database`, `tenant_a`, `tenant_b`) come from tests/db/conftest.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import event

from db.engine import Database
from db.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidTransitionError,
    NotFoundError,
    StaleEtagError,
    ValidationError,
)
from db.models.enums import AnalysisState, AnalysisType
from db.repositories.analyses import (
    AnalysesRepository,
    AnalysisFilter,
    CreatedAnalysis,
    NewAnalysis,
)
from db.repositories.batches import BatchesRepository, BatchState, BatchView
from db.repositories.model_performance import (
    ModelPerformanceFilter,
    ModelPerformanceRepository,
    NewModelPerformance,
)
from db.tenancy import Tenant

S = AnalysisType.SENTIMENT


async def create(database: Database, tenant: Tenant, new: NewAnalysis) -> CreatedAnalysis:
    async with database.transaction(tenant) as session:
        return await AnalysesRepository(session, tenant).create(new, create_by="tester")


async def new_batch(database: Database, tenant: Tenant, name: str = "b") -> BatchView:
    async with database.transaction(tenant) as session:
        return await BatchesRepository(session, tenant).create(name)


async def advance(
    database: Database,
    tenant: Tenant,
    analysis_id: uuid.UUID,
    *states: AnalysisState,
    **extra: object,
) -> None:
    for state in states:
        async with database.transaction(tenant) as session:
            await AnalysesRepository(session, tenant).update(analysis_id, {"state": state, **extra})


async def test_create_hashes_and_deduplicates_per_type_and_tenant(
    database: Database, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    first = await create(database, tenant_a, NewAnalysis("héllo", S))
    assert not first.deduplicated
    assert first.analysis.content_hash == hashlib.sha256("héllo".encode()).hexdigest()
    assert first.analysis.state is AnalysisState.PENDING
    assert first.analysis.create_by == "tester"

    again = await create(database, tenant_a, NewAnalysis("héllo", S, analysis_id=uuid.uuid4()))
    assert again.deduplicated
    assert again.analysis.id == first.analysis.id

    other_type = await create(database, tenant_a, NewAnalysis("héllo", AnalysisType.QUALITY))
    other_tenant = await create(database, tenant_b, NewAnalysis("héllo", S))
    assert not other_type.deduplicated
    assert not other_tenant.deduplicated
    assert len({first.analysis.id, other_type.analysis.id, other_tenant.analysis.id}) == 3


async def test_concurrent_creates_of_one_text_write_one_row(
    database: Database, tenant_a: Tenant
) -> None:
    results = await asyncio.gather(
        *(create(database, tenant_a, NewAnalysis("same text", S)) for _ in range(5))
    )
    assert len({r.analysis.id for r in results}) == 1
    assert sum(not r.deduplicated for r in results) == 1


async def test_deleted_analysis_no_longer_deduplicates_and_undelete_conflicts(
    database: Database, tenant_a: Tenant
) -> None:
    first = await create(database, tenant_a, NewAnalysis("t", S))
    async with database.transaction(tenant_a) as session:
        deleted = await AnalysesRepository(session, tenant_a).soft_delete(first.analysis.id)
    assert deleted.delete_time is not None
    second = await create(database, tenant_a, NewAnalysis("t", S))
    assert not second.deduplicated
    assert second.analysis.id != first.analysis.id
    with pytest.raises(AlreadyExistsError):
        async with database.transaction(tenant_a) as session:
            await AnalysesRepository(session, tenant_a).undelete(first.analysis.id)


async def test_taken_analysis_id_is_already_exists(database: Database, tenant_a: Tenant) -> None:
    first = await create(database, tenant_a, NewAnalysis("one", S))
    with pytest.raises(AlreadyExistsError):
        await create(database, tenant_a, NewAnalysis("two", S, analysis_id=first.analysis.id))


async def test_validation_and_missing_batch(database: Database, tenant_a: Tenant) -> None:
    with pytest.raises(ValidationError) as caught:
        await create(database, tenant_a, NewAnalysis("", S, sentiment_score=2.0))
    assert {v.field for v in caught.value.violations} == {"text", "sentiment_score"}
    with pytest.raises(NotFoundError):
        await create(database, tenant_a, NewAnalysis("x", S, batch_id=uuid.uuid4()))


async def test_state_machine(database: Database, tenant_a: Tenant) -> None:
    created = (await create(database, tenant_a, NewAnalysis("sm", S))).analysis
    with pytest.raises(InvalidTransitionError):
        await advance(database, tenant_a, created.id, AnalysisState.COMPLETED)
    await advance(database, tenant_a, created.id, AnalysisState.PENDING)  # same state: no-op
    await advance(database, tenant_a, created.id, AnalysisState.PROCESSING)
    await advance(database, tenant_a, created.id, AnalysisState.COMPLETED, sentiment_score=0.5)
    for illegal in (AnalysisState.PENDING, AnalysisState.PROCESSING, AnalysisState.FAILED):
        with pytest.raises(InvalidTransitionError):
            await advance(database, tenant_a, created.id, illegal)
    with pytest.raises(FailedPreconditionError):
        async with database.transaction(tenant_a) as session:
            await AnalysesRepository(session, tenant_a).update(created.id, {"quality_score": 0.1})
    # Moving a terminal analysis between batches is allowed.
    batch = await new_batch(database, tenant_a)
    async with database.transaction(tenant_a) as session:
        moved = await AnalysesRepository(session, tenant_a).update(
            created.id, {"batch_id": batch.batch.id}
        )
    assert moved.batch_id == batch.batch.id
    assert moved.state is AnalysisState.COMPLETED


async def test_update_checks_version_and_bumps_it(database: Database, tenant_a: Tenant) -> None:
    created = (await create(database, tenant_a, NewAnalysis("v", S))).analysis
    async with database.transaction(tenant_a) as session:
        updated = await AnalysesRepository(session, tenant_a).update(
            created.id, {"model_used": "m1"}, expected_version=created.version, update_by="u"
        )
    assert updated.version == created.version + 1
    assert updated.update_by == "u"
    with pytest.raises(StaleEtagError):
        async with database.transaction(tenant_a) as session:
            await AnalysesRepository(session, tenant_a).update(
                created.id, {"model_used": "m2"}, expected_version=created.version
            )


async def test_bulk_create_dedups_in_call_and_against_existing_atomically(
    database: Database, tenant_a: Tenant
) -> None:
    existing = (await create(database, tenant_a, NewAnalysis("old", S))).analysis
    items = [
        NewAnalysis("a", S),
        NewAnalysis("old", S),
        NewAnalysis("a", S),
        NewAnalysis("a", AnalysisType.EMOTION),
    ]
    async with database.transaction(tenant_a) as session:
        out = await AnalysesRepository(session, tenant_a).bulk_create(items)
    assert [c.deduplicated for c in out] == [False, True, True, False]
    assert out[1].analysis.id == existing.id
    assert out[2].analysis.id == out[0].analysis.id
    # An invalid item fails the whole call with an indexed path, and nothing is written.
    with pytest.raises(ValidationError) as caught:
        async with database.transaction(tenant_a) as session:
            await AnalysesRepository(session, tenant_a).bulk_create(
                [NewAnalysis("fresh", S), NewAnalysis("bad", S, quality_score=-1)]
            )
    assert caught.value.violations[0].field == "requests[1].analysis.quality_score"
    # A taken id rolls back the rows inserted before it in the same transaction.
    with pytest.raises(AlreadyExistsError):
        async with database.transaction(tenant_a) as session:
            await AnalysesRepository(session, tenant_a).bulk_create(
                [NewAnalysis("fresh", S), NewAnalysis("other", S, analysis_id=existing.id)]
            )
    async with database.transaction(tenant_a, read_only=True) as session:
        page = await AnalysesRepository(session, tenant_a).list(include_total=True)
    assert page.total_size == 3  # "old", "a" (sentiment), "a" (emotion)


async def test_batch_progress_is_derived_from_live_members(
    database: Database, tenant_a: Tenant
) -> None:
    view = await new_batch(database, tenant_a, "progress")
    assert view.progress.state is BatchState.EMPTY
    batch_id = view.batch.id
    ids = [
        (await create(database, tenant_a, NewAnalysis(f"m{i}", S, batch_id=batch_id))).analysis.id
        for i in range(5)
    ]
    R, C, F = (
        AnalysisState.PROCESSING,
        AnalysisState.COMPLETED,
        AnalysisState.FAILED,
    )
    async with database.transaction(tenant_a) as session:
        assert (await BatchesRepository(session, tenant_a).get_batch(batch_id)).progress.state is (
            BatchState.PENDING
        )
    await advance(database, tenant_a, ids[0], R)
    await advance(database, tenant_a, ids[0], C, processing_ms=100.0)
    await advance(database, tenant_a, ids[1], R)
    await advance(database, tenant_a, ids[1], C, processing_ms=300.0)
    await advance(database, tenant_a, ids[2], F)
    await advance(database, tenant_a, ids[3], R)
    async with database.transaction(tenant_a) as session:
        progress = (await BatchesRepository(session, tenant_a).get_batch(batch_id)).progress
    assert (progress.total, progress.pending, progress.processing) == (5, 1, 1)
    assert (progress.completed, progress.failed) == (2, 1)
    assert progress.mean_processing_ms == pytest.approx(200.0)
    assert progress.state is BatchState.PROCESSING
    await advance(database, tenant_a, ids[3], C)
    async with database.transaction(tenant_a) as session:
        await AnalysesRepository(session, tenant_a).soft_delete(ids[4])  # pending one leaves
        progress = (await BatchesRepository(session, tenant_a).get_batch(batch_id)).progress
    assert (progress.total, progress.pending, progress.failed) == (4, 0, 1)
    assert progress.state is BatchState.COMPLETED_WITH_FAILURES


async def test_list_batches_pages_with_progress_in_two_statements(
    database: Database, tenant_a: Tenant
) -> None:
    batches = [await new_batch(database, tenant_a, f"batch {i}") for i in range(5)]
    await create(database, tenant_a, NewAnalysis("member", S, batch_id=batches[2].batch.id))
    statements: list[str] = []

    def count(*args: object) -> None:
        statements.append(str(args[2]))

    event.listen(database.engine.sync_engine, "before_cursor_execute", count)
    try:
        seen: list[BatchView] = []
        cursor = None
        for _ in range(10):
            async with database.transaction(tenant_a, read_only=True) as session:
                page = await BatchesRepository(session, tenant_a).list(
                    page_size=2, cursor=cursor, order_by="display_name"
                )
            seen += page.items
            cursor = page.next_cursor
            if cursor is None:
                break
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", count)
    assert [v.batch.display_name for v in seen] == [f"batch {i}" for i in range(5)]
    assert [v.progress.total for v in seen] == [0, 0, 1, 0, 0]
    selects = [
        s for s in statements if s.lstrip().upper().startswith("SELECT") and "set_config" not in s
    ]
    assert len(selects) == 3 * 2  # three pages, each: the page and one aggregate


async def test_batch_crud_etag_and_soft_delete(database: Database, tenant_a: Tenant) -> None:
    view = await new_batch(database, tenant_a, "crud")
    batch_id, version = view.batch.id, view.batch.version
    async with database.transaction(tenant_a) as session:
        updated = await BatchesRepository(session, tenant_a).update(
            batch_id, {"description": "d"}, expected_version=version
        )
    assert updated.batch.description == "d"
    assert updated.batch.version == version + 1
    with pytest.raises(StaleEtagError):
        async with database.transaction(tenant_a) as session:
            await BatchesRepository(session, tenant_a).soft_delete(
                batch_id, expected_version=version
            )
    async with database.transaction(tenant_a) as session:
        deleted = await BatchesRepository(session, tenant_a).soft_delete(batch_id)
    assert deleted.delete_time is not None
    with pytest.raises(NotFoundError):  # a deleted batch takes no new members
        await create(database, tenant_a, NewAnalysis("late", S, batch_id=batch_id))
    async with database.transaction(tenant_a) as session:
        restored = await BatchesRepository(session, tenant_a).undelete(batch_id)
    assert restored.delete_time is None


async def test_list_analyses_filters_and_keyset_orders(
    database: Database, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    ids = []
    for i in range(7):
        created = await create(database, tenant_a, NewAnalysis(f"text {i}", S))
        ids.append(created.analysis.id)
        if i % 2 == 0:
            await advance(database, tenant_a, created.analysis.id, AnalysisState.PROCESSING)
        if i < 3:  # durations 0, 10, 20 ms on the first three; none on the rest
            async with database.transaction(tenant_a) as session:
                await AnalysesRepository(session, tenant_a).update(
                    created.analysis.id, {"processing_ms": 10.0 * i, "model_used": "m"}
                )
    await create(database, tenant_b, NewAnalysis("foreign", S))

    async def walk(order_by: str | None, filter: AnalysisFilter | None = None) -> list[uuid.UUID]:
        out: list[uuid.UUID] = []
        cursor = None
        for _ in range(20):
            async with database.transaction(tenant_a, read_only=True) as session:
                page = await AnalysesRepository(session, tenant_a).list(
                    filter, page_size=2, cursor=cursor, order_by=order_by
                )
            out += [a.id for a in page.items]
            cursor = page.next_cursor
            if cursor is None:
                return out
        raise AssertionError("pagination did not end")

    assert await walk(None) == list(reversed(ids))
    assert await walk("create_time") == ids
    by_duration = await walk("processing_duration desc, create_time")
    assert by_duration[:3] == [ids[2], ids[1], ids[0]]
    assert by_duration[3:] == ids[3:]  # no duration: last, then by create_time
    processing = await walk("create_time", AnalysisFilter(state=AnalysisState.PROCESSING))
    assert processing == [ids[0], ids[2], ids[4], ids[6]]
    assert await walk("create_time", AnalysisFilter(model_used="m")) == ids[:3]
    with pytest.raises(ValidationError):
        await walk("text")


async def test_statistics_match_hand_computed_values(
    database: Database, tenant_a: Tenant, tenant_b: Tenant
) -> None:
    # sentiment: 3 (2 completed by m1 at 100/200 ms, 1 pending); quality: 1 failed by m2
    # at 50 ms; 1 deleted sentiment (excluded); tenant B's row (excluded).
    a = [(await create(database, tenant_a, NewAnalysis(f"s{i}", S))).analysis.id for i in range(3)]
    q = (await create(database, tenant_a, NewAnalysis("q", AnalysisType.QUALITY))).analysis.id
    gone = (await create(database, tenant_a, NewAnalysis("gone", S))).analysis.id
    await create(database, tenant_b, NewAnalysis("b", S))
    for analysis_id, ms in ((a[0], 100.0), (a[1], 200.0)):
        await advance(database, tenant_a, analysis_id, AnalysisState.PROCESSING)
        await advance(
            database,
            tenant_a,
            analysis_id,
            AnalysisState.COMPLETED,
            processing_ms=ms,
            model_used="m1",
        )
    await advance(database, tenant_a, q, AnalysisState.FAILED, processing_ms=50.0, model_used="m2")
    async with database.transaction(tenant_a) as session:
        await AnalysesRepository(session, tenant_a).soft_delete(gone)
        stats = await AnalysesRepository(session, tenant_a).statistics()
        only_sentiment = await AnalysesRepository(session, tenant_a).statistics(
            AnalysisFilter(analysis_type=S)
        )
    assert stats.total == 4
    assert stats.by_type == {S: 3, AnalysisType.QUALITY: 1}
    assert stats.by_state == {
        AnalysisState.COMPLETED: 2,
        AnalysisState.PENDING: 1,
        AnalysisState.FAILED: 1,
    }
    assert [(m.model_used, m.count, m.mean_processing_ms) for m in stats.by_model] == [
        ("m1", 2, pytest.approx(150.0)),
        (None, 1, None),
        ("m2", 1, pytest.approx(50.0)),
    ]
    assert stats.mean_processing_ms == pytest.approx(350.0 / 3)
    assert only_sentiment.total == 3
    assert only_sentiment.mean_processing_ms == pytest.approx(150.0)


async def test_model_performance_create_and_list(database: Database, tenant_a: Tenant) -> None:
    start = datetime(2025, 1, 1, tzinfo=UTC)
    async with database.transaction(tenant_a) as session:
        repo = ModelPerformanceRepository(session, tenant_a)
        for day in range(4):
            await repo.create(
                NewModelPerformance(
                    model_name="bert" if day < 3 else "gpt",
                    model_version="1",
                    window_start=start + timedelta(days=day),
                    window_end=start + timedelta(days=day + 1),
                    accuracy=0.9,
                    request_count=10,
                    error_count=1,
                )
            )
    with pytest.raises(ValidationError) as caught:
        async with database.transaction(tenant_a) as session:
            await ModelPerformanceRepository(session, tenant_a).create(
                NewModelPerformance("m", "1", start, start - timedelta(1), f1_score=1.5)
            )
    assert {v.field for v in caught.value.violations} == {"window_end_time", "f1_score"}
    async with database.transaction(tenant_a, read_only=True) as session:
        repo = ModelPerformanceRepository(session, tenant_a)
        first = await repo.list(
            ModelPerformanceFilter(model_name="bert"), page_size=2, include_total=True
        )
        second = await repo.list(
            ModelPerformanceFilter(model_name="bert"), page_size=2, cursor=first.next_cursor
        )
        ranged = await repo.list(
            ModelPerformanceFilter(
                window_start_from=start + timedelta(days=1),
                window_start_to=start + timedelta(days=3),
            ),
            order_by="window_start_time",
        )
    assert first.total_size == 3
    days = [r.window_start.day for r in first.items + second.items]
    assert days == [3, 2, 1]
    assert second.next_cursor is None
    assert [r.window_start.day for r in ranged.items] == [2, 3]
