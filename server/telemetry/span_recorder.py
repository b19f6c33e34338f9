"""Ferrule's Tracer and Span: the SDK's pipeline, without the SDK's per-span cost.

Why: the SDK's ``Tracer.start_span`` plus ``Span.end`` cost about 30 us per span on an
idle interpreter and about twice that inside the loaded server (cold caches), and every
RPC records at least two spans (the RPC and its SQL). With every RPC sampled that was
most of tracing's cost: the SDK builds a ``BoundedAttributes`` (with a lock) per span
and per event, two ``BoundedList`` (each with a lock), a lock per span, and copies the
span into a new ``ReadableSpan`` at ``end``. The bench (``make bench BENCH_ARGS=tracing``)
compares both (``FERRULE_FAST_SPANS``).

What stays the SDK's: :class:`FastTracerProvider` *is* an SDK ``TracerProvider``, so the
resource, the sampler (``OTEL_TRACES_SAMPLER``), the id generator, the span limits
(``OTEL_SPAN_*``, ``OTEL_ATTRIBUTE_*``), the span processors (``BatchSpanProcessor`` with
``OTEL_BSP_*``) and the exporters are the SDK's own. :class:`RecordedSpan` is an SDK
``ReadableSpan``, handed to the processors as the SDK hands its spans.

What is Ferrule's: the span object keeps its attributes in a plain dict (primitive
values, the common case, skip the cleaning that ``BoundedAttributes`` applies to
sequences and unknown types, which still goes through it), takes no locks, and is
handed to ``on_end`` itself (it refuses changes once ended, so it needs no copy).
Sampling decisions, trace flags and state, attribute and event limits, exception
events and the status rules are the SDK's, checked field by field against the SDK's
spans for the same calls (tests/server/test_span_recorder.py).

Not kept: the SDK's self-metrics (``OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED``), its
experimental tracer configurator and ``_on_ending`` hook. A span is meant to be changed
by the task that owns it (as every Ferrule span is); concurrent writers from several
threads are not serialized as the SDK's lock would.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterator, Mapping, Sequence
from time import time_ns
from types import TracebackType
from typing import Any

from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    Event,
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    Tracer,
    TracerProvider,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import DEFAULT_ON, Decision, Sampler
from opentelemetry.sdk.util.instrumentation import InstrumentationInfo, InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.util import types
from opentelemetry.util._decorator import _agnosticcontextmanager

__all__ = ["FastTracer", "FastTracerProvider", "RecordedSpan"]

log = logging.getLogger(__name__)

#: Values stored as they are (the SDK's cleaning returns these unchanged, bar long str).
_PRIMITIVES = frozenset({str, bool, int, float})
_UNSET = Status(StatusCode.UNSET)
#: Trace flags by (sampled, random trace id): four shared objects, not one per span.
_FLAGS = {
    (sampled, random): TraceFlags(
        (TraceFlags.SAMPLED if sampled else TraceFlags.DEFAULT)
        | (TraceFlags.RANDOM_TRACE_ID if random else 0)
    )
    for sampled in (False, True)
    for random in (False, True)
}


def _cleaned(value: Any, max_length: int | None) -> tuple[bool, Any]:
    """``(valid, value)`` as ``BoundedAttributes`` would store it (the slow path)."""
    holder = BoundedAttributes(None, {"v": value}, max_value_len=max_length)
    if "v" not in holder:
        return False, None
    return True, holder["v"]


def _append_bounded(items: list[Any], item: Any, maximum: int | None) -> int:
    """Append as ``BoundedList`` does (the oldest goes when full); returns how many dropped."""
    if maximum is None or len(items) < maximum:
        items.append(item)
        return 0
    if maximum:
        del items[0]
        items.append(item)
    return 1


class RecordedSpan(trace_api.Span, ReadableSpan):
    """A recording span; once ended, the ``ReadableSpan`` the processors receive."""

    def __init__(
        self,
        tracer: FastTracer,
        name: str,
        context: SpanContext,
        parent: SpanContext | None,
        kind: SpanKind,
        attributes: types.Attributes,
        links: Sequence[Link],
        start_time: int | None,
        record_exception: bool,
        set_status_on_exception: bool,
    ) -> None:
        # ReadableSpan's fields, set directly: its __init__ adds nothing we need.
        self._name = name
        self._context = context
        self._span_context = context  # typed: ReadableSpan's _context may be None
        self._kind = kind
        self._instrumentation_info = tracer.instrumentation_info
        self._instrumentation_scope = tracer.instrumentation_scope
        self._parent = parent
        self._start_time = start_time if start_time is not None else time_ns()
        self._end_time: int | None = None
        self._resource = tracer.resource
        self._status = _UNSET
        self._tracer = tracer
        self._record_exception = record_exception
        self._set_status_on_exception = set_status_on_exception
        self._attributes: dict[str, Any] = {}
        self._dropped_attributes = 0
        self._events: list[Event] = []
        self._dropped_events = 0
        self._links: list[Link] = []
        self._dropped_links = 0
        if attributes:
            self._set_items(attributes)
        if links:
            self._set_links(links)

    def __repr__(self) -> str:
        return f'{type(self).__name__}(name="{self._name}", context={self._context})'

    # --- ReadableSpan: counts kept as plain ints ----------------------------------------
    @property
    def dropped_attributes(self) -> int:
        return self._dropped_attributes

    @property
    def dropped_events(self) -> int:
        return self._dropped_events

    @property
    def dropped_links(self) -> int:
        return self._dropped_links

    # --- attributes ---------------------------------------------------------------------
    def _store(self, key: str, value: Any) -> None:
        tracer = self._tracer
        # Primitive values (the common case) need no cleaning unless strings are bounded.
        if type(value) not in _PRIMITIVES or (
            type(value) is str
            and not tracer.unbounded_strings
            and len(value) > tracer.limits.max_span_attribute_length  # type: ignore[operator]
        ):
            valid, value = _cleaned(value, tracer.limits.max_span_attribute_length)
            if not valid:
                self._dropped_attributes += 1
                return
        if not key or type(key) is not str:
            log.warning("invalid attribute key %r: dropped", key)
            self._dropped_attributes += 1
            return
        attributes = self._attributes
        capacity = tracer.attribute_capacity
        if key in attributes:
            del attributes[key]  # re-inserted last, as BoundedAttributes does
        elif capacity is not None and len(attributes) >= capacity:
            self._dropped_attributes += 1
            if capacity == 0:
                return
            del attributes[next(iter(attributes))]  # the oldest goes
        attributes[key] = value

    def _set_items(self, attributes: Mapping[str, types.AnyValue]) -> None:
        for key, value in attributes.items():
            self._store(key, value)

    def set_attributes(self, attributes: Mapping[str, types.AnyValue]) -> None:
        if self._end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        self._set_items(attributes)

    def set_attribute(self, key: str, value: types.AnyValue) -> None:
        if self._end_time is not None:
            log.warning("Setting attribute on ended span.")
            return
        self._store(key, value)

    # --- events and links -----------------------------------------------------------------
    def add_event(
        self,
        name: str,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
    ) -> None:
        if self._end_time is not None:
            log.warning("Tried calling add_event on an ended span.")
            return
        limits = self._tracer.limits
        event = Event(
            name=name,
            attributes=BoundedAttributes(
                limits.max_event_attributes,
                attributes,
                max_value_len=limits.max_attribute_length,
                immutable=True,
            ),
            timestamp=timestamp,
        )
        self._dropped_events += _append_bounded(self._events, event, limits.max_events)

    def _set_links(self, links: Sequence[Link]) -> None:
        for link in links:
            if not link or not (
                link.context.is_valid or link.attributes or link.context.trace_state
            ):
                continue
            self._add_link(link.context, link.attributes)

    def _add_link(self, context: SpanContext, attributes: types.Attributes) -> None:
        limits = self._tracer.limits
        link = Link(
            context,
            BoundedAttributes(
                limits.max_link_attributes,
                attributes,
                max_value_len=limits.max_attribute_length,
                immutable=True,
            ),
        )
        self._dropped_links += _append_bounded(self._links, link, limits.max_links)

    def add_link(self, context: SpanContext, attributes: types.Attributes = None) -> None:
        if self._end_time is not None:
            log.warning("Tried calling add_link on an ended span.")
            return
        if context and (context.is_valid or attributes or context.trace_state):
            self._add_link(context, attributes)

    def record_exception(
        self,
        exception: BaseException,
        attributes: types.Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        module = type(exception).__module__
        qualname = type(exception).__qualname__
        values: dict[str, types.AnyValue] = {
            "exception.type": f"{module}.{qualname}"
            if module and module != "builtins"
            else qualname,
            "exception.message": str(exception),
            "exception.stacktrace": "".join(traceback.format_exception(exception)),
            "exception.escaped": str(escaped),
        }
        if attributes:
            values.update(attributes)
        self.add_event("exception", values, timestamp)

    # --- the rest of the Span API -------------------------------------------------------
    def get_span_context(self) -> SpanContext:
        return self._span_context

    def is_recording(self) -> bool:
        return self._end_time is None

    def update_name(self, name: str) -> None:
        if self._end_time is not None:
            log.warning("Tried calling update_name on an ended span.")
            return
        self._name = name

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        if self._end_time is not None:
            log.warning("Tried calling set_status on an ended span.")
            return
        # OK is final; UNSET never overrides (the SDK's rules).
        if self._status.status_code is StatusCode.OK:
            return
        if isinstance(status, Status):
            if status.status_code is StatusCode.UNSET:
                return
            if description is not None:
                log.warning(
                    "Description %s ignored. Use either `Status` or `(StatusCode, Description)`",
                    description,
                )
            self._status = status
        elif status is not StatusCode.UNSET:
            self._status = Status(status, description)

    def end(self, end_time: int | None = None) -> None:
        if self._end_time is not None:
            log.warning("Calling end() on an ended span.")
            return
        self._end_time = end_time if end_time is not None else time_ns()
        self._tracer.span_processor.on_end(self)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if exc_val is not None and self.is_recording():
            if self._record_exception:
                self.record_exception(exc_val, escaped=True)
            if self._set_status_on_exception:
                self.set_status(Status(StatusCode.ERROR, f"{type(exc_val).__name__}: {exc_val}"))
        super().__exit__(exc_type, exc_val, exc_tb)


class FastTracer(trace_api.Tracer):
    """Starts :class:`RecordedSpan` s with the provider's sampler, ids and limits."""

    def __init__(
        self,
        sampler: Sampler,
        resource: Resource,
        span_processor: SpanProcessor,
        id_generator: IdGenerator,
        limits: SpanLimits,
        instrumentation_info: InstrumentationInfo,
        instrumentation_scope: InstrumentationScope,
    ) -> None:
        self.sampler = sampler
        self.resource = resource
        self.span_processor = span_processor
        self.id_generator = id_generator
        self.limits = limits
        #: Attribute writes that cannot hit a limit take the short path in RecordedSpan.
        self.attribute_capacity = limits.max_span_attributes
        self.unbounded_strings = limits.max_span_attribute_length is None
        self.instrumentation_info = instrumentation_info
        self.instrumentation_scope = instrumentation_scope

    def start_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
    ) -> trace_api.Span:
        links = links or ()
        parent: SpanContext | None = trace_api.get_current_span(context).get_span_context()
        if parent is None or not parent.is_valid:
            parent = None
            trace_id = self.id_generator.generate_trace_id()
            random = self.id_generator.is_trace_id_random()
        else:
            trace_id = parent.trace_id
            random = parent.trace_flags.random_trace_id
        if self.sampler is DEFAULT_ON:
            # The SDK's default sampler, ParentBased(ALWAYS_ON), decided inline (its
            # should_sample looks the parent up twice more and builds a SamplingResult):
            # a parent's decision is kept, a root is sampled; the parent's state is kept.
            sampled = recording = parent is None or parent.trace_flags.sampled
            trace_state = parent.trace_state if parent is not None else None
        else:
            result = self.sampler.should_sample(context, trace_id, name, kind, attributes, links)
            sampled = result.decision is Decision.RECORD_AND_SAMPLE
            recording = result.decision is not Decision.DROP
            trace_state = result.trace_state
            attributes = result.attributes
        span_context = SpanContext(
            trace_id,
            self.id_generator.generate_span_id(),
            is_remote=False,
            trace_flags=_FLAGS[sampled, random],
            trace_state=trace_state,
        )
        if not recording:
            return trace_api.NonRecordingSpan(span_context)
        span = RecordedSpan(
            self,
            name,
            span_context,
            parent,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        self.span_processor.on_start(span, parent_context=context)  # type: ignore[arg-type]
        return span

    @_agnosticcontextmanager  # as the SDK's: also decorates coroutine functions
    def start_as_current_span(
        self,
        name: str,
        context: context_api.Context | None = None,
        kind: SpanKind = SpanKind.INTERNAL,
        attributes: types.Attributes = None,
        links: Sequence[Link] | None = (),
        start_time: int | None = None,
        record_exception: bool = True,
        set_status_on_exception: bool = True,
        end_on_exit: bool = True,
    ) -> Iterator[trace_api.Span]:
        span = self.start_span(
            name,
            context,
            kind,
            attributes,
            links,
            start_time,
            record_exception,
            set_status_on_exception,
        )
        with trace_api.use_span(
            span,
            end_on_exit=end_on_exit,
            record_exception=record_exception,
            set_status_on_exception=set_status_on_exception,
        ) as current:
            yield current


class FastTracerProvider(TracerProvider):
    """The SDK's ``TracerProvider`` (configuration, processors, shutdown) handing out
    :class:`FastTracer` s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._fast_tracers: dict[InstrumentationScope, FastTracer] = {}

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: types.Attributes = None,
    ) -> trace_api.Tracer:
        sdk_tracer = super().get_tracer(
            instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )
        if not isinstance(sdk_tracer, Tracer):  # disabled: the SDK's NoOpTracer
            return sdk_tracer
        scope = sdk_tracer._instrumentation_scope
        with self._tracers_lock:
            tracer = self._fast_tracers.get(scope)
            if tracer is None:
                tracer = FastTracer(
                    self.sampler,
                    self.resource,
                    self._active_span_processor,
                    self.id_generator,
                    self._span_limits,
                    sdk_tracer.instrumentation_info,
                    scope,
                )
                self._fast_tracers[scope] = tracer
        return tracer

    def _update_resource(self, resource: Resource) -> None:
        # After a fork the SDK adds the new process's attributes; keep the tracers in step.
        super()._update_resource(resource)
        with self._tracers_lock:
            for tracer in self._fast_tracers.values():
                tracer.resource = self.resource
