"""A SERVER span per RPC, continued from the caller's ``traceparent``, plus RPC metrics.

Place it right after CallContextInterceptor: it records the trace id on the CallContext
(for logs and the request log) and sets the db layer's StatementContext, so every
statement carries the RPC method in its SQL comment and its span joins this trace.

Why not opentelemetry-instrumentation-grpc's aio server interceptor: it cannot see the
tenant (known only after authorization, read here from the CallContext when the span
ends), does not fill Ferrule's CallContext or the db StatementContext, and would need a
second interceptor for the RPC metrics; this one is a thin ScopedInterceptor instead.
"""

from __future__ import annotations

import time
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import SpanKind, Status, StatusCode

from db.observability import StatementContext, reset_statement_context, set_statement_context
from server.call_context import Metadata, maybe_current_call
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
    exit_status,
)
from server.telemetry.metrics import ServerMetrics, default_metrics

__all__ = ["TracingInterceptor", "peer_attributes"]

#: Codes that mean the server failed (OpenTelemetry's gRPC conventions); others are the
#: caller's problem and leave the server span's status unset.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def peer_attributes(peer: str | None) -> dict[str, str | int]:
    """``ipv4:10.0.0.1:5000`` / ``ipv6:[::1]:5000`` / ``unix:/path`` -> network.peer.*."""
    if not peer:
        return {}
    kind, _, address = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = address.rpartition(":")
        attributes: dict[str, str | int] = {"network.peer.address": host.strip("[]")}
        if port.isdigit():
            attributes["network.peer.port"] = int(port)
        return attributes
    if kind == "unix":
        return {"network.peer.address": address}
    return {"network.peer.address": peer}


#: The parent of a call whose metadata propagates nothing (what extract returns for it).
_NO_PARENT = otel_context.Context()


def _metadata_carrier(metadata: Metadata) -> dict[str, str]:
    carrier: dict[str, str] = {}
    for key, value in metadata:
        if not key.endswith("-bin"):
            carrier[key] = value if isinstance(value, str) else value.decode("ascii", "replace")
    return carrier


class TracingInterceptor(SyncScopedInterceptor):
    def __init__(
        self,
        *,
        tracer_provider: trace.TracerProvider | None = None,
        metrics: ServerMetrics | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self._tracer = trace.get_tracer("ferrule.server", tracer_provider=tracer_provider)
        self._tracer_provider = tracer_provider
        self._metrics = metrics
        self._propagator = propagator
        self._names: dict[str, tuple[str, dict[str, str]]] = {}
        self._fields_of: TextMapPropagator | None = None
        self._fields: frozenset[str] = frozenset()

    def _describe(self, method: str) -> tuple[str, dict[str, str]]:
        described = self._names.get(method)
        if described is None:
            name = method.lstrip("/")
            service, _, rpc = name.partition("/")
            described = (name, {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc})
            if len(self._names) < 1024:
                self._names[method] = described
        return described

    def scope(self, method: str, context: Context, request: Any) -> _RpcScope:
        """One call's scope (also an async context manager)."""
        return _RpcScope(self, method, context, self._may_record())

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory:
        may_record = self._may_record()
        return lambda context, request: _RpcScope(self, method, context, may_record)

    def _may_record(self) -> bool:
        """Whether a span started without a propagated parent can be anything but the
        invalid one: not with a no-op provider, nor without any (none given, none
        installed globally). Asked when a method's handler is built, that is before its
        first call: a provider installed globally after that serves only methods first
        called later (setup_telemetry installs it before the server starts)."""
        provider = self._tracer_provider or trace.get_tracer_provider()
        return not isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider))

    def _propagator_in_use(self) -> TextMapPropagator:
        return self._propagator or propagate.get_global_textmap()

    def _propagated(self, metadata: Metadata, propagator: TextMapPropagator) -> bool:
        """Whether the call's metadata carries any field ``propagator`` reads (a caller's
        trace context or baggage)."""
        if propagator is not self._fields_of:
            # A propagator's fields are fixed for its life: read them once per propagator
            # (a composite one builds a new set each time it is asked).
            self._fields = frozenset(propagator.fields)
            self._fields_of = propagator
        fields = self._fields
        return any(key in fields for key, _ in metadata)


class _RpcScope(ScopeContextManager):
    """The span, metrics and statement context of one RPC."""

    __slots__ = (
        "_call",
        "_context",
        "_context_token",
        "_interceptor",
        "_may_record",
        "_method",
        "_metrics",
        "_span",
        "_started",
        "_statement_token",
    )

    def __init__(
        self, interceptor: TracingInterceptor, method: str, context: Context, may_record: bool
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._context = context
        self._may_record = may_record

    def enter(self) -> None:
        interceptor = self._interceptor
        method, context = self._method, self._context
        name, rpc_attributes = interceptor._describe(method)
        propagator = interceptor._propagator_in_use()
        trace_id: str | None = None
        call = self._call = maybe_current_call()
        # Outside a CallContext (a scope driven on its own), the context's metadata.
        metadata = call.metadata if call is not None else context.invocation_metadata() or ()
        span: trace.Span | None = None
        if interceptor._propagated(metadata, propagator):
            # A caller's context: continued even by a provider that records nothing, so
            # that the call still carries the caller's trace id.
            parent = propagator.extract(_metadata_carrier(metadata))
            span = interceptor._tracer.start_span(
                name, context=parent, kind=SpanKind.SERVER, attributes=rpc_attributes
            )
        else:
            # Nothing propagated: the parent is the empty context extract would return.
            # Without a provider that records, the span would be the invalid one: the
            # untraced hot path does not ask for it. A provider may still answer it (a
            # sampler), and the call then skips the rest of the span work too.
            parent = _NO_PARENT
            if self._may_record:
                span = interceptor._tracer.start_span(
                    name, context=parent, kind=SpanKind.SERVER, attributes=rpc_attributes
                )
                if not span.get_span_context().is_valid:
                    span = None
        if span is None:
            self._span = None
            self._context_token = None
        else:
            if span.is_recording():
                span.set_attributes(peer_attributes(context.peer()))
            self._span = span
            self._context_token = otel_context.attach(trace.set_span_in_context(span, parent))
            span_context = span.get_span_context()
            if span_context.is_valid:
                trace_id = trace.format_trace_id(span_context.trace_id)
        if call is not None:
            call.trace_id = trace_id
        self._statement_token = set_statement_context(
            StatementContext(
                rpc_method=name,
                tenant=call.organization_id if call is not None else None,
                trace_id=trace_id,
            )
        )
        metrics = self._metrics = interceptor._metrics or default_metrics()
        metrics.rpc_started(method)
        self._started = time.perf_counter()

    def exit(self, exc: BaseException | None) -> None:
        span = self._span
        if span is None:
            reset_statement_context(self._statement_token)
            if self._metrics.records_rpcs:  # else nothing here reads the call's status
                code, _ = exit_status(self._context, exc)
                elapsed = time.perf_counter() - self._started
                self._metrics.rpc_finished(self._method, code.name, elapsed)
            return
        code, error = exit_status(self._context, exc)
        elapsed = time.perf_counter() - self._started
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            call = self._call
            tenant = call.organization_id if call is not None else None
            if tenant:
                span.set_attribute("ferrule.tenant", tenant)
            if error is not None:
                # The type only: messages can carry request data.
                span.set_attribute("error.type", type(error).__qualname__)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        if reset_statement_context(self._statement_token) and self._context_token is not None:
            otel_context.detach(self._context_token)  # else: a copy nobody reads
        self._metrics.rpc_finished(self._method, code.name, elapsed)
