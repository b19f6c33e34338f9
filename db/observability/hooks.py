"""SQLAlchemy engine hooks: statement comments, spans, timings and the slow-query digest.

They are plain ``before_cursor_execute`` / ``after_cursor_execute`` / ``handle_error``
listeners on the sync engine behind an AsyncEngine. SQLAlchemy runs those inside a
greenlet that shares the calling task's contextvars, so the current OpenTelemetry span
and the StatementContext set by the server are visible here and the statement span
becomes a child of the RPC span.

Why not opentelemetry-instrumentation-sqlalchemy: its commenter appends the traceparent
(unique per statement, which defeats asyncpg's prepared-statement cache and shows a
different text for every call in pg_stat_activity), its spans carry the raw statement
(with inlined literals), and it has no slow-query digest, pool wait or RPC method; the
timing hooks would have to exist anyway, so one set of listeners does everything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import URL, Engine
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import NullPool

from db.engine_factory import async_engine
from db.observability.context import StatementContext, current_statement_context
from db.observability.normalize import comment_for, normalize_statement, operation_of
from db.observability.stats import QueryStatistics, SlowQueryDigest

__all__ = ["EngineObserver", "QueryObservers", "install_statement_observers", "observer_of"]

log = logging.getLogger("ferrule.db.observability")
slow_log = logging.getLogger("ferrule.db.slow_query")

_PENDING = "_ferrule_pending"
_POOL_WAIT = "ferrule.pool_wait_s"
#: Execution option that hides a statement from the observers (their own EXPLAINs).
UNOBSERVED = "ferrule_unobserved"
_EXPLAINABLE = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE", "WITH", "VALUES", "MERGE"})
_MAX_PARAM_CHARS = 256

_OBSERVED: weakref.WeakKeyDictionary[Engine, EngineObserver] = weakref.WeakKeyDictionary()


class _Pending:
    """What before_cursor_execute hands to after_cursor_execute / handle_error."""

    __slots__ = ("context", "executemany", "parameters", "parent", "span", "started", "statement")

    def __init__(
        self,
        statement: str,
        parameters: Any,
        executemany: bool,
        context: StatementContext | None,
        parent: Span,
        span: Span | None,
    ) -> None:
        self.statement = statement
        self.parent = parent
        self.parameters = parameters
        self.executemany = executemany
        self.context = context
        self.span = span
        self.started = time.perf_counter()


def observer_of(engine: AsyncEngine | Engine) -> EngineObserver | None:
    """The observer of ``engine``, for code that runs statements on the driver connection
    (bypassing SQLAlchemy's events) and must still be commented, traced and timed."""
    sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
    return _OBSERVED.get(sync_engine)


def _flatten_parameters(parameters: Any) -> dict[str, str]:
    """``db.query.parameter.<key>`` attributes (only when parameter tracing is on)."""
    if isinstance(parameters, Mapping):
        items: Sequence[tuple[Any, Any]] = list(parameters.items())
    elif isinstance(parameters, Sequence) and not isinstance(parameters, str | bytes):
        items = list(enumerate(parameters))
    else:
        return {}
    return {f"db.query.parameter.{key}": repr(value)[:_MAX_PARAM_CHARS] for key, value in items}


def _hex_trace_id(span: Span) -> str | None:
    span_context = span.get_span_context()
    return trace.format_trace_id(span_context.trace_id) if span_context.is_valid else None


class EngineObserver:
    """The listeners on one engine (the primary, or a replica)."""

    def __init__(self, owner: QueryObservers, engine: Engine) -> None:
        self.owner = owner
        self.engine = engine
        url = engine.url
        self.url: URL = url
        self.system = engine.dialect.name
        database = url.database or ""
        self.namespace = os.path.basename(database) if self.system == "sqlite" else database
        self.double_percent = engine.dialect.paramstyle in ("format", "pyformat")
        # Only what the parent RPC span does not already say: every attribute costs CPU
        # per span to record and more to export. The RPC method and
        # tenant are on the SERVER span, and in the slow-query log and digest.
        self.base_attributes: dict[str, str | int] = {"db.system": self.system}
        if self.namespace:
            self.base_attributes["db.namespace"] = self.namespace
        if url.host:
            self.base_attributes["server.address"] = url.host
        if url.port:
            self.base_attributes["server.port"] = url.port
        self._comments: dict[str, str] = {}
        self._explain_engine: AsyncEngine | None = None
        self._listeners: list[tuple[Any, str, Callable[..., Any], dict[str, Any]]] = [
            (engine, "before_cursor_execute", self.before_cursor_execute, {"retval": True}),
            (engine, "after_cursor_execute", self.after_cursor_execute, {}),
            (engine, "handle_error", self.handle_error, {}),
        ]
        for target, name, fn, kwargs in self._listeners:
            event.listen(target, name, fn, **kwargs)
        self._pool_wait_attributes = {"db.system.name": self.system}
        _OBSERVED[engine] = self

    # --- pool wait ------------------------------------------------------------------
    def checked_out(self, info: dict[Any, Any], waited: float) -> None:
        """Note ``waited`` seconds for a pooled connection (a free one, or its creation).

        SQLAlchemy has no "checkout requested" event, only "checked out", so the code that
        asks the pool for a connection (:func:`db.session.open_transaction`, the point
        reads) times the request and reports it here. ``info`` is the pooled connection's
        info: the first statement after the checkout claims the wait for its span.
        """
        info[_POOL_WAIT] = waited
        self.owner._pool_wait_histogram.record(waited, self._pool_wait_attributes)

    # --- statements ---------------------------------------------------------------------
    def comment(self, rpc_method: str) -> str:
        comment = self._comments.get(rpc_method)
        if comment is None:
            comment = comment_for(rpc_method)
            if self.double_percent:
                comment = comment.replace("%", "%%")
            if len(self._comments) < 4096:
                self._comments[rpc_method] = comment
        return comment

    def before_cursor_execute(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> tuple[str, Any]:
        if context is None or context.execution_options.get(UNOBSERVED):
            return statement, parameters
        commented, pending = self.start(statement, parameters, conn.info, executemany)
        setattr(context, _PENDING, pending)
        return commented, parameters

    def start(
        self, statement: str, parameters: Any, info: dict[Any, Any], executemany: bool = False
    ) -> tuple[str, _Pending]:
        """Open ``statement``'s observation: the text to send (with the RPC comment) and
        what :meth:`finish` takes. ``info`` is the pooled connection's info (pool wait).

        The SQLAlchemy listeners call this, and so do reads that run on the driver
        connection directly (:mod:`db.point_reads`), so both are observed alike."""
        owner = self.owner
        sctx = current_statement_context()
        parent = trace.get_current_span()
        span: Span | None = None
        # Statement spans only inside a recording (sampled, SDK) span: with tracing off
        # or not sampled this skips all span work, and background jobs (no RPC) do not
        # start a trace per statement.
        if parent.is_recording():
            operation = operation_of(statement)
            attributes: dict[str, Any] = {
                **self.base_attributes,
                "db.operation.name": operation,
                "db.query.text": normalize_statement(statement),
            }
            if executemany:
                attributes["db.operation.batch.size"] = len(parameters)
            if owner.trace_params:
                attributes.update(_flatten_parameters(parameters))
            waited = info.pop(_POOL_WAIT, None)
            if waited is not None:
                attributes["db.client.connection.wait_time_ms"] = waited * 1000
            span = owner._tracer.start_span(
                f"{operation} {self.namespace}" if self.namespace else operation,
                kind=SpanKind.CLIENT,
                attributes=attributes,
            )
        pending = _Pending(statement, parameters, executemany, sctx, parent, span)
        if sctx is not None and sctx.rpc_method:
            statement = self.comment(sctx.rpc_method) + statement
        return statement, pending

    def finish(self, pending: _Pending, rowcount: int, error: BaseException | None) -> None:
        """Close an observation opened by :meth:`start` (rowcount -1 when unknown)."""
        self.owner._finish(self, pending, time.perf_counter() - pending.started, rowcount, error)

    def after_cursor_execute(
        self,
        conn: Any,
        cursor: Any,
        statement: str,
        parameters: Any,
        context: Any,
        executemany: bool,
    ) -> None:
        pending: _Pending | None = getattr(context, _PENDING, None)
        if pending is None:
            return
        setattr(context, _PENDING, None)
        try:
            rowcount = int(cursor.rowcount)
        except Exception:  # some drivers raise once the cursor is closed
            rowcount = -1
        self.finish(pending, rowcount, None)

    def handle_error(self, exception_context: Any) -> None:
        context = exception_context.execution_context
        pending: _Pending | None = getattr(context, _PENDING, None)
        if pending is None:
            return
        setattr(context, _PENDING, None)
        self.finish(pending, -1, exception_context.original_exception)

    # --- EXPLAIN ----------------------------------------------------------------------
    def explain_engine(self) -> AsyncEngine:
        """A pool-less engine for EXPLAINs: never the caller's connection or transaction."""
        if self.owner._explain_engine is not None:
            return self.owner._explain_engine
        if self._explain_engine is None:
            self._explain_engine = async_engine(
                self.url,
                poolclass=NullPool,
                # Unnamed statements only: safe behind PgBouncer in transaction mode.
                connect_args={"statement_cache_size": 0, "prepared_statement_cache_size": 0},
            )
        return self._explain_engine

    async def explain(self, normalized: str, statement: str, parameters: Any) -> None:
        owner = self.owner
        try:
            async with self.explain_engine().connect() as conn:
                conn = await conn.execution_options(**{UNOBSERVED: True})
                # EXPLAIN without ANALYZE never runs the statement; read-only and a short
                # timeout make sure of it and bound the cost.
                await conn.exec_driver_sql("SET TRANSACTION READ ONLY")
                await conn.exec_driver_sql(
                    f"SET LOCAL statement_timeout = {int(owner.explain_timeout_ms)}"
                )
                if owner.trace_params:
                    # Values may be shown: the custom plan for the values actually sent.
                    result = await conn.exec_driver_sql(
                        "EXPLAIN (FORMAT JSON) " + statement, parameters if parameters else None
                    )
                    raw = result.scalar_one()
                else:
                    raw = await self._explain_generic(conn, statement, parameters)
                await conn.rollback()
            plan = json.loads(raw) if isinstance(raw, str | bytes) else raw
            owner.slow_queries.attach_plan(normalized, plan)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The message could quote parameter values: log the type only.
            log.warning(
                "EXPLAIN of a slow statement failed",
                extra={"ferrule": {"db.query.text": normalized, "error.type": type(exc).__name__}},
            )

    @staticmethod
    async def _explain_generic(conn: Any, statement: str, parameters: Any) -> Any:
        """The generic plan, which shows ``$n`` where a custom plan would show the values.

        PostgreSQL 16 has ``EXPLAIN (GENERIC_PLAN)``; PREPARE plus a forced generic plan
        does the same on every supported version, and no value is ever sent.
        """
        count = (
            len(parameters)
            if isinstance(parameters, Sequence) and not isinstance(parameters, str | bytes)
            else 0
        )
        # Unique, so a failed DEALLOCATE can never collide with a later PREPARE.
        name = f"ferrule_explain_{uuid.uuid4().hex}"
        await conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
        await conn.exec_driver_sql(f"PREPARE {name} AS {statement}")
        try:
            nulls = f"({', '.join(['NULL'] * count)})" if count else ""
            result = await conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) EXECUTE {name}{nulls}")
            return result.scalar_one()
        finally:
            # Prepared statements outlive transactions (and PgBouncer server sessions).
            await conn.exec_driver_sql(f"DEALLOCATE {name}")

    def remove(self) -> None:
        if _OBSERVED.get(self.engine) is self:
            del _OBSERVED[self.engine]
        for target, name, fn, _ in self._listeners:
            if event.contains(target, name, fn):
                event.remove(target, name, fn)

    async def dispose(self) -> None:
        if self._explain_engine is not None:
            await self._explain_engine.dispose()
            self._explain_engine = None


class QueryObservers:
    """Statement observers of one process: statistics, slow-query digest, spans, metrics.

    Built by :func:`install_statement_observers`; attach replica engines with
    :meth:`attach` so that all statements feed the same statistics and digest.
    """

    def __init__(
        self,
        *,
        slow_query_ms: float,
        trace_params: bool,
        explain_slow: bool,
        tracer_provider: trace.TracerProvider | None = None,
        meter_provider: metrics.MeterProvider | None = None,
        explain_interval_s: float = 300.0,
        explain_timeout_ms: int = 2000,
        explain_engine: AsyncEngine | None = None,
    ) -> None:
        #: Statements at or above this many milliseconds are slow; 0 turns it off.
        self.slow_query_ms = slow_query_ms
        self.trace_params = trace_params
        self.explain_slow = explain_slow
        self.explain_interval_s = explain_interval_s
        self.explain_timeout_ms = explain_timeout_ms
        self.statistics = QueryStatistics()
        self.slow_queries = SlowQueryDigest()
        self._tracer = trace.get_tracer("ferrule.db", tracer_provider=tracer_provider)
        meter = metrics.get_meter("ferrule.db", meter_provider=meter_provider)
        self._duration = meter.create_histogram(
            "db.client.operation.duration",
            unit="s",
            description="Duration of SQL statements",
            explicit_bucket_boundaries_advisory=(
                0.001,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1.0,
                2.5,
                5.0,
                10.0,
            ),
        )
        self._pool_wait_histogram = meter.create_histogram(
            "db.client.connection.wait_time",
            unit="s",
            description="Time to obtain a connection from the pool",
            explicit_bucket_boundaries_advisory=(
                0.0001,
                0.0005,
                0.001,
                0.005,
                0.01,
                0.05,
                0.1,
                0.5,
                1.0,
                5.0,
            ),
        )
        self._slow_counter = meter.create_counter(
            "ferrule.db.slow_statements",
            unit="{statement}",
            description="Statements slower than FERRULE_SLOW_QUERY_MS",
        )
        self._metric_attributes: dict[tuple[str, str, bool], dict[str, str]] = {}
        self._explain_engine = explain_engine
        self._explained: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._observers: list[EngineObserver] = []

    def attach(self, engine: AsyncEngine | Engine) -> None:
        """Observe another engine (e.g. a read replica) into the same statistics."""
        sync_engine = engine.sync_engine if isinstance(engine, AsyncEngine) else engine
        self._observers.append(EngineObserver(self, sync_engine))

    def _attributes(self, system: str, operation: str, failed: bool) -> dict[str, str]:
        key = (system, operation, failed)
        attributes = self._metric_attributes.get(key)
        if attributes is None:
            attributes = {"db.system.name": system, "db.operation.name": operation}
            if failed:
                attributes["error.type"] = "error"
            if len(self._metric_attributes) < 256:
                self._metric_attributes[key] = attributes
        return attributes

    def _finish(
        self,
        observer: EngineObserver,
        pending: _Pending,
        elapsed: float,
        rowcount: int,
        error: BaseException | None,
    ) -> None:
        duration_ms = elapsed * 1000
        failed = error is not None
        slow = 0 < self.slow_query_ms <= duration_ms
        operation = operation_of(pending.statement)
        self.statistics.record(duration_ms, failed=failed, slow=slow)
        self._duration.record(elapsed, self._attributes(observer.system, operation, failed))
        span = pending.span
        if span is not None:
            if rowcount >= 0:
                span.set_attribute("db.rows_affected", rowcount)
            if error is not None:
                self._mark_error(span, error)
            if slow:
                span.set_attribute("ferrule.db.slow", True)
                span.add_event("slow_statement", {"duration_ms": duration_ms})
            span.end()
        if slow:
            self._slow(observer, pending, operation, duration_ms, failed)

    def _mark_error(self, span: Span, error: BaseException) -> None:
        # SQLAlchemy's adapted DBAPI errors wrap the driver's, which names the problem.
        cause = error.__cause__ if isinstance(error.__cause__, Exception) else error
        span.set_status(Status(StatusCode.ERROR, type(cause).__name__))
        span.set_attribute("error.type", type(cause).__name__)
        sqlstate = (
            getattr(error, "sqlstate", None)
            or getattr(error, "pgcode", None)
            or getattr(cause, "sqlstate", None)
        )
        if sqlstate:
            span.set_attribute("db.response.status_code", str(sqlstate))
        if self.trace_params:
            # Driver messages may quote values (e.g. a duplicate key): only when allowed.
            span.record_exception(error)

    def _slow(
        self,
        observer: EngineObserver,
        pending: _Pending,
        operation: str,
        duration_ms: float,
        failed: bool,
    ) -> None:
        normalized = normalize_statement(pending.statement)
        sctx = pending.context
        rpc_method = sctx.rpc_method if sctx else None
        tenant = sctx.tenant if sctx else None
        # The parent's trace: valid even when not recording (a continued traceparent).
        trace_id = _hex_trace_id(pending.parent) or (sctx.trace_id if sctx else None)
        self.slow_queries.record(
            normalized,
            operation,
            duration_ms,
            trace_id=trace_id,
            rpc_method=rpc_method,
            tenant=tenant,
            failed=failed,
        )
        self._slow_counter.add(1, self._attributes(observer.system, operation, failed))
        slow_log.warning(
            "slow statement (%.1f ms)",
            duration_ms,
            extra={
                "ferrule": {
                    "event": "slow_statement",
                    "trace_id": trace_id,
                    "rpc.method": rpc_method,
                    "tenant": tenant,
                    "db.system.name": observer.system,
                    "db.query.text": normalized,
                    "duration_ms": round(duration_ms, 3),
                    "failed": failed,
                }
            },
        )
        if self.explain_slow and not pending.executemany:
            self._schedule_explain(observer, normalized, operation, pending)

    def _schedule_explain(
        self, observer: EngineObserver, normalized: str, operation: str, pending: _Pending
    ) -> None:
        if observer.system != "postgresql" or operation not in _EXPLAINABLE:
            return
        now = time.monotonic()
        last = self._explained.get(normalized)
        if last is not None and now - last < self.explain_interval_s:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a sync engine outside the event loop: nothing to run it on
            return
        if len(self._explained) >= 4096:
            self._explained.clear()
        self._explained[normalized] = now
        parameters = pending.parameters
        if isinstance(parameters, Mapping):
            parameters = dict(parameters)
        elif isinstance(parameters, Sequence) and not isinstance(parameters, str | bytes):
            parameters = tuple(parameters)
        task = loop.create_task(observer.explain(normalized, pending.statement, parameters))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_for_explains(self) -> None:
        """Wait until the EXPLAINs already scheduled have finished (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def close(self) -> None:
        """Remove every listener (the engines keep working, unobserved)."""
        for observer in self._observers:
            observer.remove()
        self._observers.clear()

    async def aclose(self) -> None:
        """Remove listeners, cancel pending EXPLAINs and dispose their engines."""
        self.close_tasks()
        observers = list(self._observers)
        self.close()
        for observer in observers:
            await observer.dispose()

    def close_tasks(self) -> None:
        for task in list(self._tasks):
            task.cancel()


def install_statement_observers(
    engine: AsyncEngine | Engine,
    *,
    slow_query_ms: float,
    trace_params: bool = False,
    explain_slow: bool = False,
    tracer_provider: trace.TracerProvider | None = None,
    meter_provider: metrics.MeterProvider | None = None,
    explain_interval_s: float = 300.0,
    explain_engine: AsyncEngine | None = None,
) -> QueryObservers:
    """Observe every statement ``engine`` runs; returns the statistics and slow digest.

    Providers default to the global ones (resolved lazily, so telemetry may be set up
    after this call). ``explain_engine`` overrides the pool-less engine EXPLAINs use.
    """
    observers = QueryObservers(
        slow_query_ms=slow_query_ms,
        trace_params=trace_params,
        explain_slow=explain_slow,
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        explain_interval_s=explain_interval_s,
        explain_engine=explain_engine,
    )
    observers.attach(engine)
    return observers
