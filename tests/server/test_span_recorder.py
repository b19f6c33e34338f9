"""Ferrule's tracer records what the SDK's Tracer records: the same calls on both
providers export spans equal field by field (ids too, from one deterministic generator)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from typing import Any

import pytest
from opentelemetry import context as context_api
from opentelemetry import trace
from opentelemetry.propagators.textmap import DefaultGetter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.telemetry import setup_telemetry
from server.telemetry.span_recorder import FastTracerProvider, RecordedSpan

Scenario = Callable[[trace.TracerProvider], None]


class CountingIds(IdGenerator):
    """Ids from a counter: both providers hand out the same ones in the same order."""

    def __init__(self) -> None:
        self._next = itertools.count(1)

    def generate_span_id(self) -> int:
        return next(self._next)

    def generate_trace_id(self) -> int:
        number = next(self._next)  # low 64 bits spread out: ratio samplers look there
        return (number << 64) | (number * 0x9E3779B97F4A7C15 % 2**64)

    def is_trace_id_random(self) -> bool:
        return True


class StartRecorder(SpanProcessor):
    def __init__(self) -> None:
        self.started: list[tuple[str, bool]] = []

    def on_start(self, span: Any, parent_context: context_api.Context | None = None) -> None:
        self.started.append((span.name, span.is_recording()))


def _event_attributes(attributes: Any) -> dict[str, Any]:
    """The stack trace's last line: the frames above it are each tracer's own."""
    values = dict(attributes or {})
    if "exception.stacktrace" in values:
        values["exception.stacktrace"] = values["exception.stacktrace"].strip().splitlines()[-1]
    return values


def _flat(span: ReadableSpan) -> dict[str, Any]:
    assert span.context is not None
    scope = span.instrumentation_scope
    return {
        "name": span.name,
        "kind": span.kind,
        "context": (span.context.trace_id, span.context.span_id, int(span.context.trace_flags)),
        "trace_state": dict(span.context.trace_state),
        "parent": None
        if span.parent is None
        else (span.parent.trace_id, span.parent.span_id, span.parent.is_remote),
        "attributes": list((span.attributes or {}).items()),
        "dropped_attributes": span.dropped_attributes,
        "events": [(e.name, _event_attributes(e.attributes)) for e in span.events],
        "dropped_events": span.dropped_events,
        "links": [(link.context.span_id, dict(link.attributes or {})) for link in span.links],
        "dropped_links": span.dropped_links,
        "status": (span.status.status_code, span.status.description),
        "resource": dict(span.resource.attributes),
        "scope": (scope.name, scope.version) if scope is not None else None,
        "timed": span.start_time is not None
        and span.end_time is not None
        and span.start_time <= span.end_time,
    }


def _run(
    provider_class: type[TracerProvider],
    scenario: Scenario,
    *,
    sampler: Sampler = DEFAULT_ON,
    limits: SpanLimits | None = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, bool]]]:
    exporter = InMemorySpanExporter()
    starts = StartRecorder()
    provider = provider_class(
        sampler=sampler,
        resource=Resource({"service.name": "recorder-test"}),
        id_generator=CountingIds(),
        span_limits=limits,
        shutdown_on_exit=False,
    )
    provider.add_span_processor(starts)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    scenario(provider)
    provider.shutdown()
    return [_flat(span) for span in exporter.get_finished_spans()], starts.started


def _assert_same(
    scenario: Scenario, *, sampler: Sampler = DEFAULT_ON, limits: SpanLimits | None = None
) -> list[dict[str, Any]]:
    sdk_spans, sdk_starts = _run(TracerProvider, scenario, sampler=sampler, limits=limits)
    fast_spans, fast_starts = _run(FastTracerProvider, scenario, sampler=sampler, limits=limits)
    assert fast_spans == sdk_spans
    assert fast_starts == sdk_starts
    return fast_spans


def rpc_with_statement(provider: trace.TracerProvider) -> None:
    """What an RPC does: a server span, attributes at start and later, a SQL child."""
    server = provider.get_tracer("ferrule.server", "1.2")
    db = provider.get_tracer("ferrule.db")
    span = server.start_span(
        "ferrule.v1.UserService/GetUser",
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.method": "GetUser"},
    )
    span.set_attributes({"network.peer.address": "127.0.0.1", "network.peer.port": 4000})
    token = context_api.attach(trace.set_span_in_context(span))
    try:
        statement = db.start_span(
            "SELECT ferrule",
            kind=SpanKind.CLIENT,
            attributes={"db.system": "postgresql", "db.query.text": "SELECT ? FROM users"},
        )
        statement.set_attribute("db.rows_affected", 1)
        statement.set_attribute("ferrule.db.slow", True)
        statement.add_event("slow_statement", {"duration_ms": 250.5})
        statement.end()
    finally:
        context_api.detach(token)
    span.set_attribute("rpc.grpc.status_code", 0)
    span.set_attribute("rpc.method", "GetUser2")  # an update moves the key last
    span.end()


def cleaning_and_rules(provider: trace.TracerProvider) -> None:
    """Values the SDK cleans or refuses, the status rules, ended spans."""
    tracer = provider.get_tracer("t")
    span = tracer.start_span("rules", attributes={"list": [1, 2, 3], "bytes": b"ab"})
    span.set_attribute("tuple", ("a", "b"))
    span.set_attribute("object", object())  # type: ignore[arg-type]  # neither a value nor a sequence: None
    span.set_attribute("", "empty key")
    span.set_attribute("none", None)
    span.set_attributes({"mixed": [1, "x"], "ok": 1.5})
    span.set_status(StatusCode.UNSET)
    span.set_status(Status(StatusCode.ERROR, "first"))
    span.set_status(StatusCode.OK)
    span.set_status(StatusCode.ERROR, "after OK: ignored")
    span.update_name("renamed")
    try:
        raise KeyError("missing")
    except KeyError as exc:
        span.record_exception(exc, {"extra": "yes"})
    span.end()
    span.set_attribute("late", 1)
    span.add_event("late")
    span.set_status(StatusCode.ERROR)
    span.update_name("late")
    span.end()


def current_span_failure(provider: trace.TracerProvider) -> None:
    """start_as_current_span: children see it; an escaping exception is recorded."""
    tracer = provider.get_tracer("t")

    def fail_inside_two_spans() -> None:
        with (
            tracer.start_as_current_span("outer", kind=SpanKind.INTERNAL),
            tracer.start_as_current_span("quiet", record_exception=False),
        ):
            tracer.start_span("leaf").end()
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        fail_inside_two_spans()
    with tracer.start_span("as context manager") as span:
        span.set_attribute("inside", True)
    with pytest.raises(RuntimeError), tracer.start_span("manual") as failing:
        raise RuntimeError("x")
    assert not failing.is_recording()


def links_and_limits(provider: trace.TracerProvider) -> None:
    tracer = provider.get_tracer("t")
    first = tracer.start_span("first")
    first.end()
    span = tracer.start_span(
        "limited",
        links=[
            Link(first.get_span_context(), {"why": "retry", "n": 1}),
            Link(first.get_span_context()),
            Link(trace.INVALID_SPAN_CONTEXT),
        ],
        attributes={"a": "long value", "b": 2},
    )
    for index in range(5):
        span.set_attribute(f"k{index}", "x" * index * 3)
        span.add_event(f"event{index}", {"one": 1, "two": 2})
    span.add_link(first.get_span_context(), {"late": True})
    span.end()


def continued_trace(provider: trace.TracerProvider) -> None:
    """A remote parent from ``traceparent`` (with trace state) is continued."""
    carrier = {
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "tracestate": "vendor=value",
    }
    parent = TraceContextTextMapPropagator().extract(carrier, getter=DefaultGetter())
    tracer = provider.get_tracer("t")
    span = tracer.start_span("continued", context=parent, kind=SpanKind.SERVER)
    tracer.start_span("child", context=trace.set_span_in_context(span)).end()
    span.end()
    unsampled = TraceContextTextMapPropagator().extract(
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"},
        getter=DefaultGetter(),
    )
    dropped = tracer.start_span("not sampled", context=unsampled)
    assert not dropped.is_recording()
    dropped.end()


def many_roots(provider: trace.TracerProvider) -> None:
    tracer = provider.get_tracer("t")
    for index in range(40):
        span = tracer.start_span(f"root{index}")
        tracer.start_span("child", context=trace.set_span_in_context(span)).end()
        span.end()


def test_an_rpc_is_recorded_as_the_sdk_records_it() -> None:
    spans = _assert_same(rpc_with_statement)
    assert [span["name"] for span in spans] == ["SELECT ferrule", "ferrule.v1.UserService/GetUser"]
    statement, rpc = spans
    assert statement["parent"] == (rpc["context"][0], rpc["context"][1], False)
    assert [key for key, _ in rpc["attributes"]][-1] == "rpc.method"


def test_cleaning_status_rules_and_ended_spans_match(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    (span,) = _assert_same(cleaning_and_rules)
    attributes = dict(span["attributes"])
    assert attributes["list"] == (1, 2, 3)
    assert attributes["object"] is None and "late" not in attributes and "" not in attributes
    assert span["status"] == (StatusCode.OK, None)
    assert span["name"] == "renamed"
    assert span["events"][0][0] == "exception"
    assert span["events"][0][1]["exception.type"] == "KeyError"


def test_exceptions_in_current_spans_match() -> None:
    spans = _assert_same(current_span_failure)
    by_name = {span["name"]: span for span in spans}
    assert by_name["outer"]["status"][0] is StatusCode.ERROR
    assert [name for name, _ in by_name["outer"]["events"]] == ["exception"]
    assert by_name["quiet"]["events"] == []  # record_exception=False
    assert by_name["manual"]["status"] == (StatusCode.ERROR, "RuntimeError: x")
    assert by_name["leaf"]["parent"][1] == by_name["quiet"]["context"][1]


def test_links_and_limits_match() -> None:
    limits = SpanLimits(
        max_span_attributes=3,
        max_span_attribute_length=5,
        max_events=2,
        max_event_attributes=1,
        max_links=1,
        max_link_attributes=1,
    )
    spans = _assert_same(links_and_limits, limits=limits)
    limited = spans[-1]
    assert len(limited["attributes"]) == 3 and limited["dropped_attributes"] == 4
    assert all(len(value) <= 5 for _, value in limited["attributes"] if isinstance(value, str))
    assert len(limited["events"]) == 2 and limited["dropped_events"] == 3
    assert len(limited["links"]) == 1 and limited["dropped_links"] == 2


@pytest.mark.parametrize(
    "sampler",
    [DEFAULT_ON, ParentBased(ALWAYS_ON)],
    ids=["default_decided_inline", "parent_based_through_the_sampler"],
)
def test_a_remote_parent_and_its_trace_state_are_continued(sampler: Sampler) -> None:
    spans = _assert_same(continued_trace, sampler=sampler)
    child, continued = spans
    assert continued["context"][0] == 0x0AF7651916CD43DD8448EB211C80319C
    assert continued["parent"] == (continued["context"][0], 0xB7AD6B7169203331, True)
    assert continued["trace_state"] == {"vendor": "value"} == child["trace_state"]


@pytest.mark.parametrize(
    "sampler",
    [ALWAYS_OFF, ALWAYS_ON, TraceIdRatioBased(0.5)],
    ids=["always_off", "always_on", "ratio"],
)
def test_sampling_decisions_match(sampler: Sampler) -> None:
    spans = _assert_same(many_roots, sampler=sampler)
    if sampler is ALWAYS_OFF:
        assert spans == []
    elif sampler is ALWAYS_ON:
        assert len(spans) == 80
    else:
        assert 0 < len(spans) < 80


def test_spans_reach_the_processors_as_readable_spans() -> None:
    exporter = InMemorySpanExporter()
    telemetry = setup_telemetry(
        environ={}, set_global=False, span_processors=[SimpleSpanProcessor(exporter)]
    )
    assert isinstance(telemetry.tracer_provider, FastTracerProvider)
    rpc_with_statement(telemetry.tracer_provider)
    telemetry.shutdown()
    spans = exporter.get_finished_spans()
    assert [type(span) for span in spans] == [RecordedSpan, RecordedSpan]
    assert all(isinstance(span, ReadableSpan) for span in spans)
    assert spans[0].resource.attributes["service.name"] == "ferrule"


def test_the_sdk_tracer_remains_a_setting() -> None:
    telemetry = setup_telemetry(
        environ={},
        set_global=False,
        span_processors=[SimpleSpanProcessor(InMemorySpanExporter())],
        fast_spans=False,
    )
    assert type(telemetry.tracer_provider) is TracerProvider
    telemetry.shutdown()
