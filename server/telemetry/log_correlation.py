"""Trace and span ids on every log record written while a span is current.

A handler filter, not a logger filter: logger filters do not run for records that
propagate from child loggers, handler filters see every record the handler writes.
The ids go into the ``ferrule`` extra that server.logs.JsonFormatter merges in.
"""

from __future__ import annotations

import logging

from opentelemetry import trace

__all__ = ["TraceContextFilter", "install_log_correlation"]


class TraceContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            trace_id = trace.format_trace_id(span_context.trace_id)
            span_id = trace.format_span_id(span_context.span_id)
            record.trace_id = trace_id
            record.span_id = span_id
            extra = getattr(record, "ferrule", None)
            merged = dict(extra) if isinstance(extra, dict) else {}
            merged.setdefault("trace_id", trace_id)
            merged.setdefault("span_id", span_id)
            record.ferrule = merged
        return True


def install_log_correlation(logger: logging.Logger | None = None) -> TraceContextFilter:
    """Add the filter to every handler of ``logger`` (root by default); idempotent."""
    target = logger or logging.getLogger()
    existing = next(
        (
            f
            for handler in target.handlers
            for f in handler.filters
            if isinstance(f, TraceContextFilter)
        ),
        None,
    )
    correlation = existing or TraceContextFilter()
    for handler in target.handlers:
        if correlation not in handler.filters:
            handler.addFilter(correlation)
    return correlation
