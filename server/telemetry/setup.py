"""Tracer and meter providers from the standard OTEL_* variables, plus the Prometheus port.

- ``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER``: comma-separated ``otlp``,
  ``console``, ``none``. Unset means ``otlp`` when an OTLP endpoint variable is set and
  ``none`` otherwise (the SDK default, ``otlp``, would make a collector-less developer
  machine log export errors forever).
- ``OTEL_EXPORTER_OTLP_PROTOCOL`` (or the ``_TRACES_`` / ``_METRICS_`` variants):
  ``grpc`` (default) or ``http/protobuf``. Endpoints, headers, timeouts, the sampler
  (``OTEL_TRACES_SAMPLER``) and batch sizes (``OTEL_BSP_*``) are read by the SDK itself.
- ``OTEL_SERVICE_NAME`` (default ``ferrule``), ``OTEL_RESOURCE_ATTRIBUTES``.
- ``OTEL_SDK_DISABLED=true`` turns everything off.

With no exporter no SDK provider is installed, so the API hands out non-recording
spans and no-op instruments: tracing off costs next to nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
)

from server.telemetry.metrics import ServerMetrics, use_metrics
from server.telemetry.span_process import ChildProcessSpanExporter
from server.telemetry.span_recorder import FastTracerProvider

__all__ = ["Telemetry", "TelemetryConfigError", "setup_telemetry"]

log = logging.getLogger("ferrule.telemetry")

DEFAULT_SERVICE_NAME = "ferrule"
_KNOWN_EXPORTERS = {"otlp", "console", "none"}


class TelemetryConfigError(ValueError):
    """An OTEL_* variable names something Ferrule cannot export to."""


@dataclass
class Telemetry:
    """What setup_telemetry installed; ``shutdown`` flushes and releases it."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    metrics: ServerMetrics
    #: The bound Prometheus port (useful when 0 asked for a free one), None when off.
    metrics_port: int | None = None
    _prometheus_server: Any = field(default=None, repr=False)

    @property
    def tracing_enabled(self) -> bool:
        return self.tracer_provider is not None

    def shutdown(self) -> None:
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
            self._prometheus_server = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _exporter_names(env: Mapping[str, str], signal: str) -> list[str]:
    raw = env.get(f"OTEL_{signal}_EXPORTER")
    if raw is None:
        endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
            f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT"
        )
        return ["otlp"] if endpoint else []
    names = [name.strip().lower() for name in raw.split(",") if name.strip()]
    unknown = set(names) - _KNOWN_EXPORTERS
    if unknown:
        raise TelemetryConfigError(
            f"OTEL_{signal}_EXPORTER: unsupported {sorted(unknown)} (use otlp, console or none)"
        )
    return [name for name in names if name != "none"]


def _otlp_protocol(env: Mapping[str, str], signal: str) -> str:
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


def _otlp_span_exporter(protocol: str) -> SpanExporter:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HttpSpanExporter,
    )

    return HttpSpanExporter()


def _otlp_metric_reader(protocol: str) -> MetricReader:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        return PeriodicExportingMetricReader(OTLPMetricExporter())
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
        OTLPMetricExporter as HttpMetricExporter,
    )

    return PeriodicExportingMetricReader(HttpMetricExporter())


def _resource(service_version: str | None) -> Resource:
    resource = Resource.create({"service.version": service_version} if service_version else {})
    name = resource.attributes.get("service.name")
    if not isinstance(name, str) or name.startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": DEFAULT_SERVICE_NAME}))
    return resource


def setup_telemetry(
    *,
    metrics_port: int | None = None,
    metrics_host: str = "0.0.0.0",
    service_version: str | None = None,
    environ: Mapping[str, str] | None = None,
    set_global: bool = True,
    span_processors: Sequence[SpanProcessor] = (),
    metric_readers: Sequence[MetricReader] = (),
    export_process: bool = True,
    fast_spans: bool = True,
) -> Telemetry:
    """Install providers and exporters as the environment says; returns the handles.

    ``metrics_port`` (FERRULE_METRICS_PORT) serves Prometheus text on that port (0: any
    free port). ``span_processors`` / ``metric_readers`` add to what the environment
    configures (tests, benchmarks). ``export_process`` (FERRULE_TRACE_EXPORT_PROCESS)
    encodes and sends OTLP spans from a child process (server/telemetry/span_process.py).
    ``fast_spans`` (FERRULE_FAST_SPANS) records spans with Ferrule's tracer
    (server/telemetry/span_recorder.py) instead of the SDK's ``Tracer``; both feed the
    same SDK processors and exporters.
    ``set_global`` makes the providers the process's
    globals, which the interceptors and statement observers use by default.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(None, None, ServerMetrics(metrics.NoOpMeterProvider()))
    resource = _resource(service_version)

    tracer_provider: TracerProvider | None = None
    trace_exporters = _exporter_names(env, "TRACES")
    if trace_exporters or span_processors:
        provider_class = FastTracerProvider if fast_spans else TracerProvider
        tracer_provider = provider_class(resource=resource)
        for name in trace_exporters:
            if name == "console":
                tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            else:
                protocol = _otlp_protocol(env, "TRACES")  # checked here, used by the child
                exporter: SpanExporter = (
                    ChildProcessSpanExporter({**os.environ, **env})
                    if export_process
                    else _otlp_span_exporter(protocol)
                )
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        for processor in span_processors:
            tracer_provider.add_span_processor(processor)

    readers: list[MetricReader] = list(metric_readers)
    for name in _exporter_names(env, "METRICS"):
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            readers.append(_otlp_metric_reader(_otlp_protocol(env, "METRICS")))
    prometheus_server = None
    bound_port: int | None = None
    if metrics_port is not None:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        # A registry of our own: no clash with other collectors (or a second setup).
        registry = CollectorRegistry(auto_describe=True)
        readers.append(PrometheusMetricReader(registry=registry))
        prometheus_server, _thread = start_http_server(
            metrics_port, addr=metrics_host, registry=registry
        )
        bound_port = int(prometheus_server.server_port)
        log.info("Prometheus metrics on %s:%d", metrics_host, bound_port)
    meter_provider = MeterProvider(metric_readers=readers, resource=resource) if readers else None

    if set_global:
        if tracer_provider is not None:
            trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics.set_meter_provider(meter_provider)
    server_metrics = ServerMetrics(meter_provider or metrics.NoOpMeterProvider())
    if set_global:
        use_metrics(server_metrics)
    return Telemetry(
        tracer_provider=tracer_provider,
        meter_provider=meter_provider,
        metrics=server_metrics,
        metrics_port=bound_port,
        _prometheus_server=prometheus_server,
    )
