"""OTLP export as the OTEL_* variables configure it: the SDK's batch span processor and
OTLP/gRPC exporter deliver an RPC's spans to a real collector, the standard sampler
variables give parent-based ratio sampling, and a collector that is down costs spans,
never an RPC or a hung shutdown."""

from __future__ import annotations

import base64
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from google.protobuf.json_format import MessageToDict
from opentelemetry.context import Context
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.telemetry import setup_telemetry
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

    def wait_for(self, count: int) -> list[dict[str, Any]]:
        eventually_sync(lambda: len(self.spans()) >= count, what=f"{count} spans collected")
        return self.spans()


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


def _traced(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> TracerProvider:
    # The SDK's exporter and sampler read the process environment, as in production.
    for key, value in _environ(endpoint).items():
        monkeypatch.setenv(key, value)
    telemetry = setup_telemetry(environ=_environ(endpoint), set_global=False)
    assert telemetry.tracer_provider is not None
    return telemetry.tracer_provider


def _emit_rpc(provider: TracerProvider, parent: Context | None = None) -> None:
    """A traced RPC as the server makes one: a SERVER span and a slow SQL child span (which
    the statement observers start only under a recording span)."""
    server = provider.get_tracer("ferrule.server")
    with server.start_as_current_span(
        "ferrule.v1.UserService/GetUser",
        context=parent,
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.grpc.status_code": 0},
    ) as rpc:
        if not rpc.is_recording():
            return
        db = provider.get_tracer("ferrule.db").start_span(
            "SELECT ferrule",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.rows_affected": 1, "ratio": 0.5},
        )
        db.add_event("slow_statement", {"duration_ms": 12.5})
        db.set_attribute("flags", ("a", "b"))
        db.end()


def test_an_rpc_reaches_the_collector_as_one_trace(
    collector: tuple[Collector, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, endpoint = collector
    provider = _traced(monkeypatch, endpoint)
    _emit_rpc(provider)
    provider.shutdown()  # flushes the batch span processor
    spans = receiver.wait_for(2)
    assert len(spans) == 2
    (server,) = [s for s in spans if s["kind"] == "SPAN_KIND_SERVER"]
    (db,) = [s for s in spans if s["kind"] == "SPAN_KIND_CLIENT"]
    assert server["name"] == "ferrule.v1.UserService/GetUser"
    assert "parentSpanId" not in server
    assert db["parentSpanId"] == server["spanId"]
    assert db["traceId"] == server["traceId"]
    assert db["events"][0]["name"] == "slow_statement"
    attributes = {a["key"]: a["value"] for a in db["attributes"]}
    assert attributes["db.rows_affected"] == {"intValue": "1"}
    assert attributes["ratio"] == {"doubleValue": 0.5}
    assert attributes["flags"] == {
        "arrayValue": {"values": [{"stringValue": "a"}, {"stringValue": "b"}]}
    }
    assert {"key": "service.name", "value": {"stringValue": "ferrule-test"}} in server["resource"][
        "attributes"
    ]


def _remote(trace_id: str, sampled: bool) -> Context:
    flags = "01" if sampled else "00"
    return TraceContextTextMapPropagator().extract(
        {"traceparent": f"00-{trace_id}-b7ad6b7169203331-{flags}"}
    )


def test_parent_based_ratio_sampling_is_read_from_the_standard_variables(
    collector: tuple[Collector, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/sre.md's production setting: new traces sampled at the ratio (here 0, so none),
    a caller's decision followed either way, so a trace is never cut in half."""
    receiver, endpoint = collector
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER_ARG", "0")
    provider = _traced(monkeypatch, endpoint)
    for _ in range(50):
        _emit_rpc(provider)
    sampled_by_caller = "0af7651916cd43dd8448eb211c80319c"
    _emit_rpc(provider, _remote(sampled_by_caller, sampled=True))
    _emit_rpc(provider, _remote("1" * 32, sampled=False))
    provider.shutdown()  # every exported span has reached the collector when this returns
    spans = receiver.wait_for(2)
    assert len(spans) == 2
    # MessageToDict renders the bytes of a trace id as base64.
    expected = base64.b64encode(bytes.fromhex(sampled_by_caller)).decode()
    assert {span["traceId"] for span in spans} == {expected}


def test_a_collector_that_is_down_costs_spans_not_rpcs_nor_a_hung_shutdown(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    provider = _traced(monkeypatch, f"http://127.0.0.1:{free_port()}")  # nothing listens
    for _ in range(5):
        _emit_rpc(provider)  # recording never waits for the collector
    shutdown = threading.Thread(target=provider.shutdown, daemon=True)
    shutdown.start()
    # The exporter gives up after its timeout; without one, this would wait forever.
    eventually_sync(lambda: not shutdown.is_alive(), what="shutdown with the collector down")
