"""``python -m bench._noop_tracing_server``: the server with tracing on and a no-op exporter.

The SDK's tracer provider is installed as the server installs it and every span is
recorded (attributes, events, the BatchSpanProcessor's queue and worker thread) but the
exporter drops the batches: the cost of tracing itself, without encoding or sending.
Everything else is ``python -m server``.
"""

from __future__ import annotations

from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import server.__main__ as entry
import server.app
from server.app import FerruleApp
from server.settings import Settings
from server.telemetry import Telemetry, setup_telemetry


class DropExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


class NoOpTracedApp(FerruleApp):
    def __init__(self, settings: Settings, *, telemetry: Telemetry | None = None) -> None:
        telemetry = telemetry or setup_telemetry(
            metrics_port=settings.ferrule_metrics_port,
            span_processors=[BatchSpanProcessor(DropExporter())],
        )
        super().__init__(settings, telemetry=telemetry)


if __name__ == "__main__":
    server.app.FerruleApp = NoOpTracedApp  # type: ignore[misc]  # the class serve() builds
    entry.main()
