"""OTLP export from a child process: the collector gets what in-process export sends, and
a child that dies is replaced without the serving process noticing more than a lost batch."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.telemetry import setup_telemetry
from server.telemetry.span_process import (
    EXPORT_NICENESS,
    ChildProcessSpanExporter,
    _flatten,
    encode_request,
)
from server.telemetry.span_recorder import FastTracerProvider
from tests.polling import eventually_sync
from tests.server.process_helpers import free_port


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {**MessageToDict(span), "resource": MessageToDict(rs.resource)}
                for request in self.requests
                for rs in request.resource_spans
                for ss in rs.scope_spans
                for span in ss.spans
            ]

    def wait_for(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if len(spans) >= count:
                return spans
            time.sleep(0.05)
        raise AssertionError(f"the collector got {len(self.spans())} of {count} spans")


@pytest.fixture
def collector() -> Iterator[tuple[Collector, str]]:
    receiver = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    yield receiver, f"http://127.0.0.1:{port}"
    server.stop(None)


def _environ(endpoint: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": endpoint,
        "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        "OTEL_SERVICE_NAME": "ferrule-test",
    }


def _emit_rpc(provider: TracerProvider) -> None:
    """A traced RPC as the server makes one: a SERVER span and a slow SQL child span."""
    server = provider.get_tracer("ferrule.server")
    with server.start_as_current_span(
        "ferrule.v1.UserService/GetUser",
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 0},
    ):
        db = provider.get_tracer("ferrule.db").start_span(
            "SELECT ferrule",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.rows_affected": 1, "ratio": 0.5},
        )
        db.add_event("slow_statement", {"duration_ms": 12.5})
        db.set_attribute("flags", ("a", "b"))
        db.end()


def _comparable(span: dict[str, Any]) -> dict[str, Any]:
    """What must match between two exports of the same spans: all but ids and times."""
    dropped = {"traceId", "spanId", "parentSpanId", "startTimeUnixNano", "endTimeUnixNano"}
    kept = {k: v for k, v in span.items() if k not in dropped}
    kept["events"] = [
        {k: v for k, v in e.items() if k != "timeUnixNano"} for e in span.get("events", [])
    ]
    kept["hasParent"] = "parentSpanId" in span
    return kept


def test_the_collector_gets_what_in_process_export_sends(
    collector: tuple[Collector, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = collector
    for key, value in _environ(endpoint).items():  # the in-process exporter reads os.environ
        monkeypatch.setenv(key, value)
    results = {}
    for through_child in (True, False):
        receiver.requests.clear()
        telemetry = setup_telemetry(
            environ=_environ(endpoint), set_global=False, export_process=through_child
        )
        assert telemetry.tracer_provider is not None
        _emit_rpc(telemetry.tracer_provider)
        telemetry.shutdown()  # flushes; the child exports what it read and exits
        results[through_child] = receiver.wait_for(2)
    child, in_process = results[True], results[False]
    assert sorted(map(str, map(_comparable, child))) == sorted(
        map(str, map(_comparable, in_process))
    )
    (server,) = [s for s in child if s["kind"] == "SPAN_KIND_SERVER"]
    (db,) = [s for s in child if s["kind"] == "SPAN_KIND_CLIENT"]
    assert db["parentSpanId"] == server["spanId"]
    assert db["traceId"] == server["traceId"]
    assert db["events"][0]["name"] == "slow_statement"
    assert {"key": "service.name", "value": {"stringValue": "ferrule-test"}} in server["resource"][
        "attributes"
    ]


def _spans(count: int) -> tuple[ReadableSpan, ...]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource({"service.name": "ferrule-test"}))
    provider.add_span_processor(SimpleSpanProcessor(memory))
    for _ in range(count):
        provider.get_tracer("t").start_span("op").end()
    return memory.get_finished_spans()


class ManualClock:
    """A monotonic clock the test moves forward itself."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_dead_child_costs_one_batch_and_is_replaced(collector: tuple[Collector, str]) -> None:
    receiver, endpoint = collector
    clock = ManualClock()
    exporter = ChildProcessSpanExporter(
        {**os.environ, **_environ(endpoint)}, restart_interval_s=1.0, clock=clock
    )
    try:
        assert exporter.export(_spans(3)) is SpanExportResult.SUCCESS
        receiver.wait_for(3)
        pid = exporter.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        # Until the kernel has ended it (reading child_pid reaps it).
        eventually_sync(lambda: exporter.child_pid is None, what="the killed child's end")
        # Within the restart interval: the batch fails (dropped, as for a collector that
        # is down) and nothing raises into the serving process.
        clock.now += 0.5
        assert exporter.export(_spans(2)) is SpanExportResult.FAILURE
        assert exporter.failed_batches == 1
        clock.now += 0.5  # the interval has passed: the next batch starts a new child
        assert exporter.export(_spans(4)) is SpanExportResult.SUCCESS
        assert exporter.child_pid not in (None, pid)
        assert len(receiver.wait_for(3 + 4)) == 3 + 4
    finally:
        exporter.shutdown()
    assert exporter.child_pid is None
    assert exporter.export(_spans(1)) is SpanExportResult.FAILURE  # after shutdown


def test_a_stuck_child_fails_batches_in_bounded_time_and_never_blocks_shutdown(
    collector: tuple[Collector, str],
) -> None:
    _, endpoint = collector
    exporter = ChildProcessSpanExporter(
        {**os.environ, **_environ(endpoint)}, restart_interval_s=60.0, write_timeout_s=0.5
    )
    try:
        assert exporter.export(_spans(1)) is SpanExportResult.SUCCESS
        pid = exporter.child_pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)  # alive, but reads nothing: the pipe fills up
        started = time.monotonic()
        results = [exporter.export(_spans(200)) for _ in range(20)]
        assert SpanExportResult.FAILURE in results
        assert time.monotonic() - started < 0.5 * 20 + 5
        assert exporter.child_pid is None  # the stuck child was replaced (killed)
    finally:
        started = time.monotonic()
        exporter.shutdown()
        assert time.monotonic() - started < 15


def test_the_export_child_yields_the_cpu_to_serving(collector: tuple[Collector, str]) -> None:
    receiver, endpoint = collector
    exporter = ChildProcessSpanExporter({**os.environ, **_environ(endpoint)})
    try:
        assert exporter.export(_spans(1)) is SpanExportResult.SUCCESS
        receiver.wait_for(1)  # the child is past its start-up, niceness included
        pid = exporter.child_pid
        assert pid is not None
        expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + EXPORT_NICENESS)
        assert os.getpriority(os.PRIO_PROCESS, pid) == expected
    finally:
        exporter.shutdown()


def _varied_spans(provider_class: type[TracerProvider]) -> tuple[ReadableSpan, ...]:
    """Spans with every shape the encoder meets: the fast one and the SDK's fallbacks."""
    memory = InMemorySpanExporter()
    provider = provider_class(
        resource=Resource({"service.name": "ferrule-test", "host.cores": 2}),
        span_limits=SpanLimits(max_span_attributes=4),
        shutdown_on_exit=False,
    )
    provider.add_span_processor(SimpleSpanProcessor(memory))
    remote = TraceContextTextMapPropagator().extract(
        {
            "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "tracestate": "vendor=value,other=2",
        }
    )
    server = provider.get_tracer("ferrule.server", "1.0")
    root = server.start_span("rpc", context=remote, kind=SpanKind.SERVER, attributes={"a": 1})
    root.set_attributes({"b": True, "c": 2.5, "d": "text", "e": "over the limit"})
    root.set_status(Status(StatusCode.ERROR, "UNAVAILABLE"))
    inside = trace.set_span_in_context(root)
    db = provider.get_tracer("ferrule.db")
    db.start_span("plain", context=inside, kind=SpanKind.CLIENT, attributes={"n": 1}).end()
    # Equal as Python values, not as OTLP values (the encoder caches by value):
    for value in (1, True, 0.0, -0.0, 1.0, "1"):
        db.start_span("same value?", context=inside, attributes={"v": value}).end()
    db.start_span("sequence", context=inside, attributes={"tags": ("a", "b")}).end()
    with_event = db.start_span("event", context=inside, kind=SpanKind.PRODUCER)
    with_event.add_event("slow_statement", {"duration_ms": 250.0})
    with_event.end()
    linked = db.start_span(
        "linked", context=inside, kind=SpanKind.CONSUMER, links=[Link(root.get_span_context())]
    )
    linked.set_status(StatusCode.OK)
    linked.end()
    provider.get_tracer("other").start_span("root", kind=SpanKind.INTERNAL).end()
    root.end()
    return memory.get_finished_spans()


@pytest.mark.parametrize("provider_class", [TracerProvider, FastTracerProvider])
def test_flattened_spans_encode_as_the_sdk_encodes_them(
    provider_class: type[TracerProvider],
) -> None:
    spans = _varied_spans(provider_class)
    resource = spans[0].resource
    assert encode_request([_flatten(span) for span in spans], resource) == encode_spans(spans)
