"""Statement observers against real PostgreSQL (and SQLite): spans, comments, digest."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from db.observability import (
    SlowQueryDigest,
    comment_for,
    install_statement_observers,
    normalize_statement,
    statement_context,
)
from db.session import open_transaction
from db.tenancy import Tenant
from tests.polling import eventually

SECRET = "s3cr3t-7f1c-do-not-export"
LITERAL_SECRET = "lit3ral-91ab-do-not-export"
METHOD = "ferrule.v1.UserService/GetUser"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


@pytest.fixture
async def engine(pg_database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(pg_database_url, pool_size=2)
    # Connect once before observing, so the dialect's first-connect queries are not counted.
    async with engine.begin() as conn:
        await conn.execute(text("CREATE TABLE secrets (id int PRIMARY KEY, value text UNIQUE)"))
    yield engine
    await engine.dispose()


def _all_attribute_values(spans: tuple[ReadableSpan, ...]) -> list[str]:
    values: list[str] = []
    for span in spans:
        values.append(span.name)
        values += [str(v) for v in (span.attributes or {}).values()]
        values.append(str(span.status.description))
        for span_event in span.events:
            values.append(span_event.name)
            values += [str(v) for v in (span_event.attributes or {}).values()]
    return values


async def test_statement_spans_are_children_of_the_current_span_in_order(
    engine: AsyncEngine, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    observers = install_statement_observers(
        engine, slow_query_ms=0, tracer_provider=tracer_provider
    )
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("rpc") as parent, statement_context(METHOD, tenant="org-1"):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO secrets VALUES (1, 'a')"))
            await conn.execute(text("UPDATE secrets SET value = 'b' WHERE id = 1"))
            await conn.execute(text("SELECT value FROM secrets"))
    observers.close()

    spans = [s for s in exporter.get_finished_spans() if s.name != "rpc"]
    database = engine.url.database
    assert [s.name for s in spans] == [
        f"INSERT {database}",
        f"UPDATE {database}",
        f"SELECT {database}",
    ]
    assert all(s.parent is not None and s.parent.span_id == parent.get_span_context().span_id
               for s in spans)  # fmt: skip
    assert all(s.context.trace_id == parent.get_span_context().trace_id for s in spans)
    starts = [s.start_time or 0 for s in spans]
    assert starts == sorted(starts)
    first, update, _select = spans
    assert first.kind is trace.SpanKind.CLIENT
    assert first.attributes is not None
    assert update.attributes is not None
    assert first.attributes["db.system"] == "postgresql"
    assert first.attributes["db.query.text"] == "INSERT INTO secrets VALUES (?, ...)"
    # Method and tenant are the RPC span's; the statement's comment names the method.
    assert "ferrule.rpc.method" not in first.attributes
    assert update.attributes["db.rows_affected"] == 1


async def test_the_first_statement_after_a_checkout_carries_the_pool_wait(
    engine: AsyncEngine, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    """The transaction helper times its checkout; the wait goes to the first statement's
    span and to the connection wait histogram."""
    reader = InMemoryMetricReader()
    observers = install_statement_observers(
        engine,
        slow_query_ms=0,
        tracer_provider=tracer_provider,
        meter_provider=MeterProvider(metric_readers=[reader]),
    )
    with tracer_provider.get_tracer("test").start_as_current_span("rpc"):
        for _ in range(2):
            async with open_transaction(
                AsyncSession(bind=engine), Tenant.all(), timeout_ms=None, read_only=True
            ) as session:
                await session.execute(text("SELECT value FROM secrets"))
    observers.close()

    spans = [s for s in exporter.get_finished_spans() if s.name != "rpc"]
    assert [operation_of_span(s) for s in spans] == ["SELECT"] * 4
    waits = [(s.attributes or {}).get("db.client.connection.wait_time_ms") for s in spans]
    # Each transaction's settings statement is its first: it carries the wait.
    assert isinstance(waits[0], float) and waits[0] >= 0
    assert isinstance(waits[2], float) and waits[2] >= 0
    assert waits[1] is None and waits[3] is None
    data = reader.get_metrics_data()
    assert data is not None
    points = [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "db.client.connection.wait_time"
        for point in metric.data.data_points
    ]
    assert all(isinstance(p, HistogramDataPoint) for p in points)
    assert [(dict(p.attributes or {}), getattr(p, "count", None)) for p in points] == [
        ({"db.system.name": "postgresql"}, 2)
    ]


def operation_of_span(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("db.operation.name")


async def test_no_parameter_value_in_any_span_attribute_by_default(
    engine: AsyncEngine, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    observers = install_statement_observers(
        engine, slow_query_ms=0, tracer_provider=tracer_provider
    )
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("rpc"), statement_context(METHOD):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO secrets VALUES (:id, :v)"), {"id": 7, "v": SECRET})
            await conn.execute(text(f"SELECT id FROM secrets WHERE value <> '{LITERAL_SECRET}'"))
        # A duplicate key: PostgreSQL's message quotes the value.
        with pytest.raises(IntegrityError):
            async with engine.begin() as conn:
                await conn.execute(
                    text("INSERT INTO secrets VALUES (:id, :v)"), {"id": 8, "v": SECRET}
                )
    observers.close()

    spans = exporter.get_finished_spans()
    failed = [s for s in spans if s.status.status_code is trace.StatusCode.ERROR]
    assert len(failed) == 1
    assert failed[0].attributes is not None
    assert failed[0].attributes["db.response.status_code"] == "23505"
    exported = _all_attribute_values(spans)
    assert not [v for v in exported if SECRET in v or LITERAL_SECRET in v]


async def test_parameters_are_recorded_when_configured(
    engine: AsyncEngine, tracer_provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    observers = install_statement_observers(
        engine, slow_query_ms=0, trace_params=True, tracer_provider=tracer_provider
    )
    with tracer_provider.get_tracer("test").start_as_current_span("rpc"):
        async with engine.begin() as conn:
            await conn.execute(text("INSERT INTO secrets VALUES (:id, :v)"), {"id": 7, "v": SECRET})
    # Outside any span (a background job) statements are timed but start no trace.
    async with engine.begin() as conn:
        await conn.execute(text("SELECT 1"))
    observers.close()
    spans = exporter.get_finished_spans()
    assert [s.name for s in spans] == [f"INSERT {engine.url.database}", "rpc"]
    assert [v for v in _all_attribute_values(spans) if SECRET in v]
    assert observers.statistics.snapshot().total == 2


async def test_comment_names_the_rpc_in_pg_stat_activity(
    engine: AsyncEngine, pg_database_url: str
) -> None:
    observers = install_statement_observers(engine, slow_query_ms=0)

    async def sleeper() -> None:
        with statement_context(METHOD, tenant="org-1"):
            async with engine.connect() as conn:
                await conn.execute(text("SELECT pg_sleep(60)"))  # until seen, then cancelled

    task = asyncio.create_task(sleeper())
    watcher = await asyncpg.connect(pg_database_url.replace("+asyncpg", ""))
    try:
        seen: str | None = None

        async def running() -> bool:
            nonlocal seen
            seen = await watcher.fetchval(
                "SELECT query FROM pg_stat_activity"
                " WHERE datname = current_database() AND query LIKE '%pg_sleep%'"
                " AND pid <> pg_backend_pid() AND state = 'active'"
            )
            return seen is not None

        await eventually(running, what="the statement in pg_stat_activity")
    finally:
        await watcher.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        observers.close()
    assert seen is not None, "the statement never showed up in pg_stat_activity"
    assert seen.startswith(f"/* rpc='{METHOD}' */ SELECT pg_sleep")
    # Stable text: no trace id or tenant, which would defeat statement caching.
    assert "traceparent" not in seen
    assert "org-1" not in seen


async def test_slow_statement_lands_in_digest_with_trace_id_log_line_and_plan(
    engine: AsyncEngine,
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    observers = install_statement_observers(
        engine, slow_query_ms=50, explain_slow=True, tracer_provider=tracer_provider
    )
    async with engine.begin() as conn:  # pg_sleep in the select list runs once per row
        await conn.execute(text("INSERT INTO secrets VALUES (4242, 'x')"))
    tracer = tracer_provider.get_tracer("test")
    caplog.set_level(logging.WARNING, logger="ferrule.db.slow_query")
    with tracer.start_as_current_span("rpc") as parent, statement_context(METHOD, tenant="org-9"):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT id FROM secrets WHERE id = :id"), {"id": 4242})
            await conn.execute(
                text("SELECT pg_sleep(0.12), id FROM secrets WHERE id = :id"), {"id": 4242}
            )
    await observers.wait_for_explains()
    await observers.aclose()

    trace_id = trace.format_trace_id(parent.get_span_context().trace_id)
    # Only the sleeping statement must be slow; on a busy machine the others may be too.
    sleeping = "SELECT pg_sleep(?), id FROM secrets WHERE id = ?"
    entries = observers.slow_queries.top(10, order_by="p99")
    assert sleeping in [e.statement for e in entries]
    entry = next(e for e in entries if e.statement == sleeping)
    assert entry.count == 1
    assert entry.trace_ids == (trace_id,)
    assert entry.rpc_methods == ((METHOD, 1),)
    assert entry.tenants == ("org-9",)
    assert entry.max_ms >= 50
    assert entry.p50_ms == entry.p99_ms == entry.max_ms
    # The plan is the generic one: the value 4242 is never shown.
    assert entry.plan is not None
    assert "Plan" in entry.plan[0]
    assert "4242" not in json.dumps(entry.plan)

    slow_spans = [
        s
        for s in exporter.get_finished_spans()
        if s.events and "pg_sleep" in str((s.attributes or {}).get("db.query.text", ""))
    ]
    assert len(slow_spans) == 1
    event = slow_spans[0].events[0]
    assert event.name == "slow_statement"
    assert event.attributes is not None
    duration = event.attributes["duration_ms"]
    assert isinstance(duration, float)
    assert duration >= 50

    records = [
        r
        for r in caplog.records
        if r.name == "ferrule.db.slow_query" and r.ferrule["db.query.text"] == sleeping  # type: ignore[attr-defined]
    ]
    assert len(records) == 1
    fields: dict[str, Any] = records[0].ferrule  # type: ignore[attr-defined]
    assert fields["trace_id"] == trace_id
    assert fields["rpc.method"] == METHOD
    assert fields["tenant"] == "org-9"
    assert fields["db.query.text"] == entry.statement
    assert fields["duration_ms"] >= 50

    observers.slow_queries.reset()
    assert observers.slow_queries.top(10) == []


async def test_statistics_count_every_statement_exactly(engine: AsyncEngine) -> None:
    observers = install_statement_observers(engine, slow_query_ms=0)
    async with engine.connect() as conn:
        for i in range(5):
            await conn.execute(text("SELECT id FROM secrets WHERE id = :i"), {"i": i})
        with pytest.raises(DBAPIError):
            await conn.execute(text("SELECT 1 / 0"))
    snapshot = observers.statistics.snapshot()
    observers.close()
    assert (snapshot.total, snapshot.failed, snapshot.slow) == (6, 1, 0)
    assert snapshot.error_rate == pytest.approx(1 / 6)
    assert 0 < snapshot.mean_ms <= snapshot.max_ms
    assert 0 < snapshot.p99_ms <= snapshot.max_ms


async def test_tracing_off_still_times_and_reports_the_context_trace_id(
    engine: AsyncEngine,
) -> None:
    observers = install_statement_observers(
        engine, slow_query_ms=30, tracer_provider=trace.NoOpTracerProvider()
    )
    with statement_context(METHOD, trace_id="ab" * 16):
        async with engine.connect() as conn:
            await conn.execute(text("SELECT pg_sleep(0.05)"))
    observers.close()
    assert observers.statistics.snapshot().slow >= 1
    slow = next(e for e in observers.slow_queries.top(10) if "pg_sleep" in e.statement)
    assert slow.trace_ids == ("ab" * 16,)


async def test_embedded_sqlite_is_observed_too(sqlite_database_url: str) -> None:
    engine = create_async_engine(sqlite_database_url)
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
    observers = install_statement_observers(engine, slow_query_ms=0, explain_slow=True)
    try:
        with statement_context(METHOD):
            async with engine.connect() as conn:
                assert (await conn.execute(text("SELECT 41 + 1"))).scalar_one() == 42
        assert observers.statistics.snapshot().total == 1
    finally:
        observers.close()
        await engine.dispose()


def test_normalization_strips_literals_and_collapses_lists() -> None:
    sql = (
        "SELECT * FROM t WHERE a = 'it''s' AND b IN ($1::INTEGER, $2::INTEGER, $3::INTEGER)"
        " AND c > 10.5 AND d = $$dollar$$ /* caller */"
    )
    assert normalize_statement(sql) == (
        "SELECT * FROM t WHERE a = ? AND b IN (?, ...) AND c > ? AND d = ?"
    )
    assert normalize_statement("INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4)") == (
        "INSERT INTO t (a, b) VALUES (?, ...), ..."
    )
    assert normalize_statement('SELECT "col1", t2.x FROM t2') == 'SELECT "col1", t2.x FROM t2'


def test_comment_cannot_be_closed_by_the_method_name() -> None:
    assert comment_for("/ferrule.v1.UserService/GetUser") == (
        "/* rpc='ferrule.v1.UserService/GetUser' */ "
    )
    hostile = comment_for("x'*/ DROP TABLE t; --")
    assert hostile.count("*/") == 1
    assert hostile.count("'") == 2


def test_digest_orders_bounds_and_resets() -> None:
    digest = SlowQueryDigest(max_statements=2)
    for ms in (10.0, 10.0, 10.0):
        digest.record("SELECT a", "SELECT", ms, trace_id="t1", rpc_method="m")
    digest.record("SELECT b", "SELECT", 25.0, trace_id="t2")
    assert [e.statement for e in digest.top(2, "total")] == ["SELECT a", "SELECT b"]
    assert [e.statement for e in digest.top(2, "p99")] == ["SELECT b", "SELECT a"]
    assert digest.top(1)[0].trace_ids == ("t1",)
    digest.record("SELECT c", "SELECT", 50.0)  # evicts the cheapest (SELECT b)
    assert {e.statement for e in digest.top(5)} == {"SELECT a", "SELECT c"}
    with pytest.raises(ValueError, match="order_by"):
        digest.top(1, "bogus")  # type: ignore[arg-type]
    digest.reset()
    assert len(digest) == 0
