"""Tracing interceptor, metrics endpoint, log correlation and OTEL_* setup.

A real grpc.aio server on a free port with a generic (proto-less) handler, so these
tests need neither the Ferrule protos nor the rest of the interceptor chain.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import grpc
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from db.observability import current_statement_context, install_statement_observers
from server.call_context import current_call
from server.interceptors.call_context import CallContextInterceptor
from server.interceptors.scoped import wrap_handler
from server.interceptors.tracing import TracingInterceptor, peer_attributes
from server.logs import JsonFormatter
from server.telemetry import (
    ServerMetrics,
    TelemetryConfigError,
    TraceContextFilter,
    setup_telemetry,
)

INCOMING_TRACE = "0af7651916cd43dd8448eb211c80319c"
INCOMING_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{INCOMING_TRACE}-{INCOMING_SPAN}-01"

Handler = Callable[[bytes, grpc.aio.ServicerContext[Any, Any]], Awaitable[bytes]]


@dataclass
class Served:
    channel: grpc.aio.Channel
    seen: list[dict[str, Any]]

    async def call(self, method: str, payload: bytes = b"hi", **kwargs: Any) -> bytes:
        return await _method(self.channel, method)(payload, **kwargs)


def _method(channel: grpc.aio.Channel, name: str) -> Callable[..., Awaitable[bytes]]:
    # Generic handlers have no message types: requests and responses are raw bytes.
    return cast(Callable[..., Awaitable[bytes]], channel.unary_unary(f"/test.Echo/{name}"))


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracer_provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


async def _serve(
    interceptors: Sequence[grpc.aio.ServerInterceptor], handlers: dict[str, Handler]
) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server(interceptors=list(interceptors))
    generic = grpc.method_handlers_generic_handler(
        "test.Echo",
        {name: grpc.unary_unary_rpc_method_handler(fn) for name, fn in handlers.items()},
    )
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port


def _handlers(seen: list[dict[str, Any]], engine: AsyncEngine | None = None) -> dict[str, Handler]:
    async def say(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        statement = current_statement_context()
        seen.append(
            {
                "trace_id": current_call().trace_id,
                "rpc_method": statement.rpc_method if statement else None,
            }
        )
        current_call().organization_id = "org-42"
        logging.getLogger("ferrule.test.handler").warning("handling")
        if engine is not None:
            async with engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
                await conn.execute(text("SELECT 2"))
        return request

    async def missing(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
        raise AssertionError("unreachable")

    async def broken(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        raise RuntimeError("boom with request data")

    return {"Say": say, "Missing": missing, "Broken": broken}


@pytest.fixture
async def served(tracer_provider: TracerProvider) -> AsyncIterator[Served]:
    seen: list[dict[str, Any]] = []
    interceptors = [
        CallContextInterceptor(),
        TracingInterceptor(tracer_provider=tracer_provider, metrics=ServerMetrics()),
    ]
    server, port = await _serve(interceptors, _handlers(seen))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield Served(channel, seen)
    await server.stop(None)


def _server_spans(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.kind is trace.SpanKind.SERVER]


async def test_incoming_traceparent_is_continued(
    served: Served, exporter: InMemorySpanExporter
) -> None:
    assert await served.call("Say", metadata=(("traceparent", TRACEPARENT),)) == b"hi"
    (span,) = _server_spans(exporter)
    assert span.name == "test.Echo/Say"
    assert trace.format_trace_id(span.context.trace_id) == INCOMING_TRACE
    assert span.parent is not None
    assert trace.format_span_id(span.parent.span_id) == INCOMING_SPAN
    assert span.parent.is_remote
    attributes = dict(span.attributes or {})
    assert attributes["rpc.system"] == "grpc"
    assert attributes["rpc.service"] == "test.Echo"
    assert attributes["rpc.method"] == "Say"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["ferrule.tenant"] == "org-42"
    assert attributes["network.peer.address"] == "127.0.0.1"
    assert span.status.status_code is trace.StatusCode.UNSET
    # The handler saw the trace id on its CallContext and the method in the db context.
    assert served.seen == [{"trace_id": INCOMING_TRACE, "rpc_method": "test.Echo/Say"}]


async def test_without_traceparent_a_new_trace_starts(
    served: Served, exporter: InMemorySpanExporter
) -> None:
    await served.call("Say")
    (span,) = _server_spans(exporter)
    assert span.parent is None
    assert served.seen[0]["trace_id"] == trace.format_trace_id(span.context.trace_id)


async def test_status_codes_and_error_status(
    served: Served, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as not_found:
        await served.call("Missing")
    assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await served.call("Broken")
    assert unknown.value.code() is grpc.StatusCode.UNKNOWN
    missing, broken = _server_spans(exporter)
    assert (missing.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # A caller's mistake is not a server error; an unhandled exception is.
    assert missing.status.status_code is trace.StatusCode.UNSET
    assert (broken.attributes or {})["rpc.grpc.status_code"] == grpc.StatusCode.UNKNOWN.value[0]
    assert (broken.attributes or {})["error.type"] == "RuntimeError"
    assert broken.status.status_code is trace.StatusCode.ERROR
    values = [str(v) for v in (broken.attributes or {}).values()]
    assert not [v for v in values if "request data" in v]


async def test_one_trace_holds_client_server_and_sql_spans(
    tracer_provider: TracerProvider, exporter: InMemorySpanExporter, pg_database_url: str
) -> None:
    engine = create_async_engine(pg_database_url)
    observers = install_statement_observers(
        engine, slow_query_ms=0, tracer_provider=tracer_provider
    )
    seen: list[dict[str, Any]] = []
    interceptors = [CallContextInterceptor(), TracingInterceptor(tracer_provider=tracer_provider)]
    server, port = await _serve(interceptors, _handlers(seen, engine))
    tracer = tracer_provider.get_tracer("test.client")
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with tracer.start_as_current_span("client", kind=trace.SpanKind.CLIENT) as client:
                carrier: dict[str, str] = {}
                propagate.inject(carrier)
                await _method(channel, "Say")(b"x", metadata=tuple(carrier.items()))
    finally:
        await server.stop(None)
        observers.close()
        await engine.dispose()
    spans = exporter.get_finished_spans()
    assert {s.context.trace_id for s in spans} == {client.get_span_context().trace_id}
    (server_span,) = [s for s in spans if s.kind is trace.SpanKind.SERVER]
    sql = [s for s in spans if s.name.startswith("SELECT")]
    assert server_span.parent is not None
    assert server_span.parent.span_id == client.get_span_context().span_id
    assert len(sql) == 2
    assert all(s.parent is not None and s.parent.span_id == server_span.context.span_id
               for s in sql)  # fmt: skip
    # The RPC method is the parent's attribute (not repeated per statement).
    assert (server_span.attributes or {})["rpc.method"] == "Say"


async def test_log_lines_during_an_rpc_carry_trace_and_span_ids(
    served: Served, exporter: InMemorySpanExporter
) -> None:
    lines: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(self.format(record))

    handler = Collect()
    handler.setFormatter(JsonFormatter())
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("ferrule.test.handler")
    logger.addHandler(handler)
    try:
        await served.call("Say", metadata=(("traceparent", TRACEPARENT),))
    finally:
        logger.removeHandler(handler)
    (span,) = _server_spans(exporter)
    (line,) = lines
    entry = json.loads(line)
    assert entry["trace_id"] == INCOMING_TRACE
    assert entry["span_id"] == trace.format_span_id(span.context.span_id)


async def test_with_tracing_off_a_call_still_carries_its_callers_trace_id() -> None:
    """A provider that records nothing (the untraced hot path skips span work): the
    caller's propagated trace id still reaches the call, its logs and the request log; a
    call without one has none; the method still reaches the SQL comment context."""
    seen: list[dict[str, Any]] = []
    interceptors = [
        CallContextInterceptor(),
        TracingInterceptor(tracer_provider=trace.NoOpTracerProvider()),
    ]
    server, port = await _serve(interceptors, _handlers(seen))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            served = Served(channel, seen)
            await served.call("Say", metadata=(("traceparent", TRACEPARENT),))
            await served.call("Say")
            await served.call("Say", metadata=(("x-other", "1"),))
    finally:
        await server.stop(None)
    assert seen == [
        {"trace_id": INCOMING_TRACE, "rpc_method": "test.Echo/Say"},
        {"trace_id": None, "rpc_method": "test.Echo/Say"},
        {"trace_id": None, "rpc_method": "test.Echo/Say"},
    ]


@dataclass
class _Pool:
    size: int = 5
    checked_out: int = 2
    overflow: int = 0


@dataclass
class _Cache:
    hits: int = 9
    misses: int = 3
    near_hits: int = 7
    near_entries: int = 4
    near_tracking: bool = True


def _fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


async def test_prometheus_endpoint_serves_rpc_histogram_after_a_call(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_SDK_DISABLED"):
        monkeypatch.delenv(name, raising=False)
    telemetry = setup_telemetry(
        metrics_port=0, metrics_host="127.0.0.1", environ={}, set_global=False
    )
    assert telemetry.metrics_port
    telemetry.metrics.observe_pool(_Pool)
    telemetry.metrics.observe_cache(_Cache)
    seen: list[dict[str, Any]] = []
    interceptors = [CallContextInterceptor(), TracingInterceptor(metrics=telemetry.metrics)]
    server, port = await _serve(interceptors, _handlers(seen))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await _method(channel, "Say")(b"x")
        telemetry.metrics.record_rows_ingested(25, kind="prediction")
        body = await asyncio.to_thread(_fetch, f"http://127.0.0.1:{telemetry.metrics_port}/metrics")
    finally:
        await server.stop(None)
        telemetry.shutdown()
    histogram = [
        line
        for line in body.splitlines()
        if line.startswith("rpc_server_call_duration_seconds_count")
    ]
    assert len(histogram) == 1
    assert 'rpc_method="Say"' in histogram[0]
    assert 'rpc_grpc_status_code="OK"' in histogram[0]
    assert histogram[0].endswith(" 1.0")
    assert "rpc_server_call_duration_seconds_bucket" in body
    assert "ferrule_db_pool_checked_out" in body
    assert "ferrule_cache_hits" in body
    for name, value in (
        ("ferrule_cache_near_hits_total", " 7.0"),
        ("ferrule_cache_near_entries", " 4.0"),
        ("ferrule_cache_near_tracking", " 1.0"),
    ):
        assert any(
            line.startswith(name + "{") and line.endswith(value) for line in body.splitlines()
        ), name
    assert any(
        line.startswith("ferrule_rows_ingested") and line.endswith(" 25.0")
        for line in body.splitlines()
    )


def test_setup_reads_exporters_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_SERVICE_NAME", raising=False)
    monkeypatch.delenv("OTEL_RESOURCE_ATTRIBUTES", raising=False)
    off = setup_telemetry(environ={}, set_global=False)
    assert off.tracer_provider is None
    assert off.meter_provider is None

    console = setup_telemetry(environ={"OTEL_TRACES_EXPORTER": "console"}, set_global=False)
    assert console.tracer_provider is not None
    assert console.tracer_provider.resource.attributes["service.name"] == "ferrule"
    console.shutdown()

    for protocol in ("grpc", "http/protobuf"):
        otlp = setup_telemetry(
            environ={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            },
            set_global=False,
        )
        assert otlp.tracer_provider is not None
        assert otlp.meter_provider is not None
        otlp.shutdown()

    with pytest.raises(TelemetryConfigError, match="zipkin"):
        setup_telemetry(environ={"OTEL_TRACES_EXPORTER": "zipkin"}, set_global=False)
    with pytest.raises(TelemetryConfigError, match="PROTOCOL"):
        setup_telemetry(
            environ={"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"},
            set_global=False,
        )
    disabled = setup_telemetry(
        environ={"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
        set_global=False,
    )
    assert disabled.tracer_provider is None


def test_peer_attributes_parse_grpc_peers() -> None:
    assert peer_attributes("ipv6:[::1]:5000") == {
        "network.peer.address": "::1",
        "network.peer.port": 5000,
    }
    assert peer_attributes("ipv4:10.0.0.1:80") == {
        "network.peer.address": "10.0.0.1",
        "network.peer.port": 80,
    }
    assert peer_attributes("unix:/tmp/sock") == {"network.peer.address": "/tmp/sock"}
    assert peer_attributes(None) == {}


class _StreamContext:
    """What the tracing scope reads from a servicer context, for a stream driven by hand."""

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return ()

    def peer(self) -> str:
        return "ipv4:127.0.0.1:5000"

    def code(self) -> grpc.StatusCode | None:
        return None

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self._never = asyncio.get_running_loop().create_future()

    async def write(self, message: bytes) -> None:
        """Accepts the message, then waits like a send that flow control holds back."""
        self.written.append(message)
        await self._never


async def test_a_response_stream_closed_from_another_context_still_ends_its_scope(
    tracer_provider: TracerProvider,
    exporter: InMemorySpanExporter,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A streaming handler's coroutine whose task was dropped (its call's cancellation
    never reached it) is closed by the garbage collector, in whatever context the
    collection happens. The scope must still end cleanly there: span ended, metrics
    counted, no 'Token ... created in a different Context'."""

    async def responses(request: bytes, context: Any) -> AsyncIterator[bytes]:
        while True:
            yield b"row"

    interceptor = TracingInterceptor(tracer_provider=tracer_provider, metrics=ServerMetrics())
    handler = wrap_handler(
        grpc.unary_stream_rpc_method_handler(responses),
        lambda context, request: interceptor.scope("/test.Echo/Stream", context, request),
    )
    behaviour: Any = handler.unary_stream
    context = _StreamContext()
    writer = cast(Coroutine[Any, Any, None], behaviour(b"", context))
    # The RPC's own context runs it up to its first write, which never completes.
    contextvars.copy_context().run(writer.send, None)
    assert context.written == [b"row"]
    with caplog.at_level(logging.WARNING):
        writer.close()  # the collector, here: another context
    assert [r.getMessage() for r in caplog.records] == []  # OpenTelemetry's detach logs
    spans = _server_spans(exporter)
    assert [s.name for s in spans] == ["test.Echo/Stream"]
    assert spans[0].attributes is not None
    assert spans[0].attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert current_statement_context() is None
