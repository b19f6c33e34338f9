"""OTLP span export from a child process, so the serving process does not pay the encoding.

Why: the SDK's OTLP encoder costs about 90 us of CPU per span of ours (28 us plus ~7 us
per attribute, measured), in the BatchSpanProcessor's thread of the serving process,
holding the GIL the event loop needs. With every RPC traced that was most of tracing's
cost. Flattening the same span to plain tuples and ``marshal`` costs 8 us.

How: the SDK's own ``BatchSpanProcessor`` still batches, queues, drops and flushes as
``OTEL_BSP_*`` say; its exporter here, :class:`ChildProcessSpanExporter`, writes each
batch as one length-prefixed ``marshal`` frame to the stdin of ``python -m
server.telemetry.export_child``. That child sends them with the SDK's OTLP exporter that
``OTEL_*`` configures. Over gRPC (the default) the exporter encodes the flattened spans
with :func:`encode_request` (the spans Ferrule records, directly: a ninth of the SDK
encoder's CPU; any other span through the SDK's own span encoder); over HTTP the child
rebuilds ``ReadableSpan`` s for the SDK's encoder. Either way the collector receives
exactly what the in-process exporter sends (tested message for message).
``FERRULE_TRACE_EXPORT_PROCESS=false`` exports in-process instead.

Failure: a child that died fails the batch it was handed (the SDK drops it, as for an
unreachable collector) and the next batch starts a new child. Closing stdin (shutdown)
makes the child export what it has and exit.
"""

from __future__ import annotations

import contextlib
import logging
import marshal
import os
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

from opentelemetry.exporter.otlp.proto.common._internal import (
    _encode_instrumentation_scope,
    _encode_resource,
)
from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_span
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PBSpan
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PBStatus
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import (
    Link,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

from server.telemetry.span_recorder import RecordedSpan

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
#: Seconds between attempts to start a child after one died.
RESTART_INTERVAL_S = 1.0
#: Added to the child's niceness: exporting spans yields the CPU to serving RPCs.
EXPORT_NICENESS = 10
#: Seconds a batch may wait for the child to read it before the child is replaced.
WRITE_TIMEOUT_S = 10.0


def _context(context: SpanContext) -> tuple[int, int, int, bool]:
    return (context.trace_id, context.span_id, int(context.trace_flags), context.is_remote)


def _flatten(span: ReadableSpan) -> tuple[Any, ...]:
    """The span as plain values ``marshal`` takes (what OTLP carries of it)."""
    if type(span) is RecordedSpan:
        return _flatten_recorded(span)
    assert span.context is not None
    scope = span.instrumentation_scope
    trace_state = span.context.trace_state
    return (
        span.name,
        _context(span.context),
        _context(span.parent) if span.parent is not None else None,
        span.kind.value,
        span.start_time,
        span.end_time,
        dict(span.attributes or {}),
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in span.events],
        [(_context(link.context), dict(link.attributes or {})) for link in span.links],
        span.status.status_code.value,
        span.status.description,
        (scope.name, scope.version) if scope is not None else None,
        tuple(trace_state.items()) if trace_state else (),
        (span.dropped_attributes, span.dropped_events, span.dropped_links),
    )


def _flatten_recorded(span: RecordedSpan) -> tuple[Any, ...]:
    """:func:`_flatten` of Ferrule's own spans from their fields (4 us per span instead of
    9, measured): their attributes are a plain dict that no longer changes once ended."""
    context = span._span_context
    parent = span._parent
    scope = span._instrumentation_scope
    status = span._status
    trace_state = context.trace_state
    events, links = span._events, span._links
    return (
        span._name,
        (context.trace_id, context.span_id, int(context.trace_flags), False),
        _context(parent) if parent is not None else None,
        span._kind.value,
        span._start_time,
        span._end_time,
        span._attributes,
        [(e.name, e.timestamp, dict(e.attributes or {})) for e in events] if events else [],
        [(_context(link.context), dict(link.attributes or {})) for link in links] if links else [],
        status.status_code.value,
        status.description,
        (scope.name, scope.version) if scope is not None else None,
        tuple(trace_state.items()) if trace_state else (),
        (span._dropped_attributes, span._dropped_events, span._dropped_links),
    )


def _context_of(values: Sequence[Any], trace_state: TraceState | None = None) -> SpanContext:
    trace_id, span_id, flags, remote = values
    return SpanContext(
        trace_id, span_id, is_remote=remote, trace_flags=TraceFlags(flags), trace_state=trace_state
    )


def _rebuild(values: Sequence[Any], resource: Resource) -> ReadableSpan:
    (name, context, parent, kind, start, end, attributes, events, links, code, description,
     scope, trace_state, _dropped) = values  # fmt: skip
    return ReadableSpan(
        name=name,
        context=_context_of(context, TraceState(list(trace_state))),
        parent=_context_of(parent) if parent is not None else None,
        resource=resource,
        attributes=attributes,
        events=[Event(n, attributes=a, timestamp=t) for n, t, a in events],
        links=[Link(_context_of(c), attributes=a) for c, a in links],
        kind=SpanKind(kind),
        status=Status(StatusCode(code), description),
        start_time=start,
        end_time=end,
        instrumentation_scope=InstrumentationScope(*scope) if scope is not None else None,
    )


#: Attribute values the fast encoder writes itself, by type (bool before int, as the SDK).
_VALUE_FIELDS = {str: "string_value", bool: "bool_value", int: "int_value", float: "double_value"}
_REMOTE_PARENT_FLAGS = (
    SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
)


#: Attribute key/value pairs, serialized (as Span field 9) once: most repeat on every
#: span (the RPC, the statement text, the database, the tenant). Bounded; cleared when full.
_ATTRIBUTE_BYTES: dict[tuple[str, type, Any], bytes] = {}
ATTRIBUTE_CACHE_SIZE = 8192


def _attribute_bytes(attributes: Mapping[str, Any]) -> bytes | None:
    """The attributes as serialized ``Span.attributes`` entries; None when a value is not a
    primitive (the SDK's encoder handles those)."""
    parts = []
    cache = _ATTRIBUTE_BYTES
    for key, value in attributes.items():
        kind = type(value)
        # Floats are not cached: they rarely repeat (durations), and -0.0 == 0.0.
        cache_key = (key, kind, value) if kind is not float else None  # True == 1, too
        encoded = cache.get(cache_key) if cache_key is not None else None
        if encoded is None:
            field = _VALUE_FIELDS.get(kind)
            if field is None:
                return None
            attribute = KeyValue(key=key, value=AnyValue(**{field: value}))
            encoded = PBSpan(attributes=[attribute]).SerializeToString()
            if cache_key is not None:
                if len(cache) >= ATTRIBUTE_CACHE_SIZE:
                    cache.clear()
                cache[cache_key] = encoded
        parts.append(encoded)
    return b"".join(parts)


def _add_span(spans: Any, values: Sequence[Any], resource: Resource) -> None:
    """Append one flattened span to ``spans`` (a repeated field) as the SDK's
    ``_encode_span`` encodes it, built in place (a message appended is copied).

    Spans with only primitive attributes and no events or links (nearly every Ferrule
    span) are built directly, their attributes merged in from cached serialized entries
    (protobuf merges concatenated messages): 7 us per span where rebuilding a
    ReadableSpan and the SDK's encoder take 62 (measured). Others take the SDK's path.
    """
    (name, context, parent, kind, start, end, attributes, events, links, code, description,
     _scope, trace_state, dropped) = values  # fmt: skip
    if not events and not links and (encoded := _attribute_bytes(attributes)) is not None:
        span = spans.add(
            trace_id=context[0].to_bytes(16, "big"),
            span_id=context[1].to_bytes(8, "big"),
            trace_state=",".join(f"{key}={value}" for key, value in trace_state),
            parent_span_id=parent[1].to_bytes(8, "big") if parent is not None else b"",
            name=name,
            kind=kind + 1,  # SpanKind.INTERNAL (0) is SPAN_KIND_INTERNAL (1), and so on
            start_time_unix_nano=start,
            end_time_unix_nano=end,
            status=PBStatus(code=code, message=description),
            dropped_attributes_count=dropped[0],
            dropped_events_count=dropped[1],
            dropped_links_count=dropped[2],
            flags=_REMOTE_PARENT_FLAGS
            if parent is not None and parent[3]
            else SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK,
        )
        span.MergeFromString(encoded)
        return
    span = _encode_span(_rebuild(values, resource))
    span.dropped_attributes_count, span.dropped_events_count, span.dropped_links_count = dropped
    spans.append(span)


def encode_request(batch: Sequence[Sequence[Any]], resource: Resource) -> ExportTraceServiceRequest:
    """A batch of flattened spans as the SDK's ``encode_spans`` encodes the same spans."""
    request = ExportTraceServiceRequest()
    if not batch:
        return request
    resource_spans = request.resource_spans.add(
        resource=_encode_resource(resource), schema_url=resource.schema_url
    )
    by_scope: dict[tuple[str, str | None] | None, Any] = {}
    for values in batch:
        scope = values[11]
        spans = by_scope.get(scope)
        if spans is None:
            encoded_scope = _encode_instrumentation_scope(
                InstrumentationScope(*scope) if scope is not None else None  # type: ignore[arg-type]  # the SDK's own encoder passes None too
            )
            spans = by_scope[scope] = resource_spans.scope_spans.add(scope=encoded_scope).spans
        _add_span(spans, values, resource)
    return request


def _flat_grpc_exporter(resource: Resource) -> SpanExporter:
    """The SDK's OTLP/gRPC exporter (endpoint, headers, TLS, retries from ``OTEL_*``)
    taking flattened spans, encoded by :func:`encode_request`."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    class FlatSpanExporter(OTLPSpanExporter):
        def _translate_data(self, data: Any) -> ExportTraceServiceRequest:
            return encode_request(data, resource)

    return FlatSpanExporter()


def _write_frame(stream: IO[bytes], payload: Any, timeout_s: float) -> None:
    """Write one frame to a non-blocking pipe; raise TimeoutError if the reader does not
    take it within ``timeout_s`` (a child stuck behind an unreachable collector must not
    hold the exporting thread, or shutdown, for ever)."""
    encoded = marshal.dumps(payload)
    data = memoryview(_LENGTH.pack(len(encoded)) + encoded)
    deadline = time.monotonic() + timeout_s
    fd = stream.fileno()
    while data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the span export process did not read in time")
        _, writable, _ = select.select([], [fd], [], remaining)
        if writable:
            try:
                written = os.write(fd, data)
            except BlockingIOError:
                continue
            data = data[written:]


def _read_frame(stream: IO[bytes]) -> Any | None:
    header = stream.read(_LENGTH.size)
    if len(header) < _LENGTH.size:
        return None
    (length,) = _LENGTH.unpack(header)
    data = stream.read(length)
    if len(data) < length:
        return None
    return marshal.loads(data)  # frames come from our parent process only


class ChildProcessSpanExporter(SpanExporter):
    """Hands batches to the child process (see the module docstring).

    ``environ`` is the child's environment (the OTLP exporter there reads ``OTEL_*``
    from it); it defaults to this process's. ``clock`` paces restarts (a monotonic
    clock in seconds; tests pass one they advance, so no test waits on the wall clock)."""

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        *,
        restart_interval_s: float = RESTART_INTERVAL_S,
        write_timeout_s: float = WRITE_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._clock = clock
        self._environ = dict(os.environ if environ is None else environ)
        self._restart_interval = restart_interval_s
        self._write_timeout = write_timeout_s
        self._child: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._next_start = 0.0
        self._closed = False
        #: Batches the child never received (it died, or could not start).
        self.failed_batches = 0

    def _start(self, resource: Resource) -> subprocess.Popen[bytes] | None:
        if self._child is not None and self._child.poll() is None:
            return self._child
        self._stop_child()
        now = self._clock()
        if now < self._next_start:
            return None
        self._next_start = now + self._restart_interval
        try:
            child = subprocess.Popen(
                [sys.executable, "-m", "server.telemetry.export_child"],
                stdin=subprocess.PIPE,
                bufsize=0,
                env=self._environ,
            )
            assert child.stdin is not None
            os.set_blocking(child.stdin.fileno(), False)
            _write_frame(
                child.stdin,
                (dict(resource.attributes), resource.schema_url),
                self._write_timeout,
            )
        except (OSError, TimeoutError) as exc:
            log.warning("span export process did not start: %s", exc)
            return None
        self._child = child
        return child

    @property
    def child_pid(self) -> int | None:
        """The running child's pid (operations, tests)."""
        child = self._child
        return child.pid if child is not None and child.poll() is None else None

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        if not spans:
            return SpanExportResult.SUCCESS
        batch = [_flatten(span) for span in spans]
        with self._lock:
            if self._closed:
                return SpanExportResult.FAILURE
            child = self._start(spans[0].resource)
            if child is None or child.stdin is None:
                self.failed_batches += 1
                return SpanExportResult.FAILURE
            try:
                _write_frame(child.stdin, batch, self._write_timeout)
            except (OSError, ValueError, TimeoutError) as exc:  # died, or stuck
                log.warning("span export process is gone: %s", exc)
                self.failed_batches += 1
                self._stop_child()
                return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return True  # every batch is written through; the child exports as it reads

    def _stop_child(self, timeout: float = 0.0) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if child.stdin is not None:
            with contextlib.suppress(OSError):
                child.stdin.close()
        try:
            child.wait(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()

    def shutdown(self) -> None:
        """Close the child's stdin and wait for it to export the rest (bounded): an
        export still writing is given its write timeout, then the child is killed."""
        self._closed = True
        if not self._lock.acquire(timeout=self._write_timeout + 1):
            child = self._child
            if child is not None:
                child.kill()  # unblocks the writer with EPIPE
            self._lock.acquire()
        try:
            self._stop_child(timeout=10.0)
        finally:
            self._lock.release()


def main() -> int:
    """The child: frames from stdin to the OTLP exporter ``OTEL_*`` configures."""
    from server.telemetry.setup import _otlp_protocol, _otlp_span_exporter

    # Background work: when the host is short of CPU, RPCs come first; the batch
    # processor's bounded queue (and the write timeout) absorbs a child that lags.
    with contextlib.suppress(OSError):
        os.nice(EXPORT_NICENESS)
    stdin = sys.stdin.buffer
    first = _read_frame(stdin)
    if first is None:
        return 0
    attributes, schema_url = first
    resource = Resource(attributes, schema_url)
    protocol = _otlp_protocol(os.environ, "TRACES")
    # OTLP/gRPC (the default) takes the flattened spans as they come; OTLP/HTTP serializes
    # inside its export(), so it gets rebuilt spans and the SDK's encoder.
    flat = protocol == "grpc"
    exporter = _flat_grpc_exporter(resource) if flat else _otlp_span_exporter(protocol)
    try:
        while (batch := _read_frame(stdin)) is not None:
            exporter.export(batch if flat else [_rebuild(values, resource) for values in batch])
    finally:
        exporter.shutdown()
    return 0
