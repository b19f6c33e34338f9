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
)

from server.telemetry.exporters import (
    TelemetryConfigError,
    exporter_names,
    otlp_metric_reader,
    otlp_protocol,
    otlp_span_exporter,
)
from server.telemetry.metrics import ServerMetrics, use_metrics

__all__ = ["Telemetry", "TelemetryConfigError", "setup_telemetry"]

log = logging.getLogger("ferrule.telemetry")

DEFAULT_SERVICE_NAME = "ferrule"


@dataclass
class Telemetry:
    """What setup_telemetry installed; ``shutdown`` flushes and releases it."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    metrics: ServerMetrics
    #: The bound Prometheus port (useful when 0 asked for a free one), None when off.
    metrics_port: int | None = None
    _prometheus_server: Any = field(default=None, repr=False)

    def shutdown(self) -> None:
        if self._prometheus_server is not None:
            self._prometheus_server.shutdown()
            self._prometheus_server.server_close()
            self._prometheus_server = None
        if self.tracer_provider is not None:
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


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
) -> Telemetry:
    """Install providers and exporters as the environment says; returns the handles.

    ``metrics_port`` (FERRULE_METRICS_PORT) serves Prometheus text on that port (0: any
    free port). ``span_processors`` / ``metric_readers`` add to what the environment
    configures (tests, benchmarks). ``set_global`` makes the providers the process's
    globals, which the interceptors and statement observers use by default.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Telemetry(None, None, ServerMetrics(metrics.NoOpMeterProvider()))
    resource = _resource(service_version)

    tracer_provider: TracerProvider | None = None
    trace_exporters = exporter_names(env, "TRACES")
    if trace_exporters or span_processors:
        # No sampler given: the SDK builds the one OTEL_TRACES_SAMPLER / _ARG name in the
        # process environment (docs/sre.md recommends parent-based ratio sampling).
        tracer_provider = TracerProvider(resource=resource)
        for name in trace_exporters:
            if name == "console":
                tracer_provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
            else:
                exporter = otlp_span_exporter(otlp_protocol(env, "TRACES"))
                tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
        for processor in span_processors:
            tracer_provider.add_span_processor(processor)

    readers: list[MetricReader] = list(metric_readers)
    for name in exporter_names(env, "METRICS"):
        if name == "console":
            readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
        else:
            readers.append(otlp_metric_reader(otlp_protocol(env, "METRICS")))
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
