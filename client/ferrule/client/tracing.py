"""Client spans and W3C trace-context propagation, through the OpenTelemetry API only.

Without an installed tracer provider the API hands out non-recording spans, so the cost
per call is a couple of function calls; ``traceparent`` is still sent when the caller
runs inside a valid (e.g. extracted) span context, so traces continue across services.
"""

from __future__ import annotations

import threading

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, TracerProvider

from ferrule import __version__

__all__ = ["RpcSpan", "client_tracer", "split_method"]


def client_tracer(provider: TracerProvider | None = None) -> Tracer:
    """The client's tracer from ``provider``, or from the global provider (None)."""
    return trace.get_tracer("ferrule.client", __version__, tracer_provider=provider)


def split_method(method: str | bytes) -> tuple[str, str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service/Method``, ``pkg.Service``, ``Method``).

    The asyncio API passes the method as bytes, the sync one as str.
    """
    name = method.decode() if isinstance(method, bytes) else method
    name = name.lstrip("/")
    service, _, rpc = name.partition("/")
    return name, service, rpc


class RpcSpan:
    """The client span of one RPC; ``finish`` is idempotent and thread-safe."""

    __slots__ = ("_done", "_lock", "span")

    def __init__(self, method: str | bytes, tracer: Tracer) -> None:
        name, service, rpc = split_method(method)
        self.span: Span = tracer.start_span(
            name,
            kind=SpanKind.CLIENT,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc},
        )
        self._done = False
        self._lock = threading.Lock()

    def headers(self) -> list[tuple[str, str]]:
        """``traceparent`` / ``tracestate`` (and baggage) naming this span as the parent."""
        if not self.span.get_span_context().is_valid:
            return []
        carrier: dict[str, str] = {}
        propagate.inject(carrier, context=trace.set_span_in_context(self.span))
        return [(key.lower(), value) for key, value in carrier.items()]

    def finish(self, code: grpc.StatusCode | None, error: BaseException | None = None) -> None:
        """End the span, recording the final status code when it is known."""
        with self._lock:
            if self._done:
                return
            self._done = True
        if self.span.is_recording():
            if code is not None:
                self.span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code is not grpc.StatusCode.OK:
                    self.span.set_status(Status(StatusCode.ERROR, code.name))
            if error is not None:
                self.span.record_exception(error)
        self.span.end()
