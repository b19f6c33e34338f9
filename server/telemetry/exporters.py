"""Which exporters the standard OTEL_* variables ask for, and the SDK's OTLP exporters
for the protocol they name (the SDK reads endpoints, headers, TLS and timeouts itself)."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "TelemetryConfigError",
    "exporter_names",
    "otlp_metric_reader",
    "otlp_protocol",
    "otlp_span_exporter",
]

KNOWN_EXPORTERS = {"otlp", "console", "none"}


class TelemetryConfigError(ValueError):
    """An OTEL_* variable names something Ferrule cannot export to."""


def exporter_names(env: Mapping[str, str], signal: str) -> list[str]:
    raw = env.get(f"OTEL_{signal}_EXPORTER")
    if raw is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = set(names) - KNOWN_EXPORTERS
    if unknown:
        raise TelemetryConfigError(
            f"OTEL_{signal}_EXPORTER: unsupported {sorted(unknown)} (use otlp, console or none)"
        )
    return [name for name in names if name != "none"]


def otlp_protocol(env: Mapping[str, str], signal: str) -> str:
    protocol = (
        env.get(f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol not in ("grpc", "http/protobuf"):
        raise TelemetryConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL: {protocol!r} is not supported (grpc, http/protobuf)"
        )
    return protocol


def otlp_span_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def otlp_metric_reader(protocol: str) -> MetricReader:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return PeriodicExportingMetricReader(OTLPMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return PeriodicExportingMetricReader(HttpMetricExporter())
