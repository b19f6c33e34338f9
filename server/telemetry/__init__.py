"""OpenTelemetry for the server process: providers, exporters, metrics, log correlation."""

from server.telemetry.log_correlation import TraceContextFilter, install_log_correlation
from server.telemetry.metrics import (
    CacheCounts,
    PoolUsage,
    ServerMetrics,
    default_metrics,
    record_rows_ingested,
    use_metrics,
)
from server.telemetry.setup import Telemetry, TelemetryConfigError, setup_telemetry

__all__ = [
    "CacheCounts",
    "PoolUsage",
    "ServerMetrics",
    "Telemetry",
    "TelemetryConfigError",
    "TraceContextFilter",
    "default_metrics",
    "install_log_correlation",
    "record_rows_ingested",
    "setup_telemetry",
    "use_metrics",
]
