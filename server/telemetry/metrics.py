"""Server metrics through the OpenTelemetry metrics API.

Instruments come from a meter of the given provider, or of the global one (a proxy until
telemetry is set up, so modules may create them at import time). Without any provider
every call is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Protocol

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation

__all__ = [
    "CacheCounts",
    "PoolUsage",
    "ServerMetrics",
    "default_metrics",
    "record_rows_ingested",
    "use_metrics",
]

log = logging.getLogger("ferrule.telemetry")

#: Seconds: from sub-millisecond cache hits to long streams.
RPC_DURATION_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class PoolUsage(Protocol):
    """What ``Database.pool_status()`` returns."""

    @property
    def size(self) -> int: ...
    @property
    def checked_out(self) -> int: ...
    @property
    def overflow(self) -> int: ...


class CacheCounts(Protocol):
    """Cumulative cache lookups since start, and the near cache's state."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def near_hits(self) -> int: ...
    @property
    def near_entries(self) -> int: ...
    @property
    def near_tracking(self) -> bool: ...


class ServerMetrics:
    """RPC latency and in-flight count, pool and cache gauges, rows ingested."""

    def __init__(self, meter_provider: metrics.MeterProvider | None = None) -> None:
        meter = metrics.get_meter("ferrule.server", meter_provider=meter_provider)
        #: False when nothing can ever read the RPC instruments (a no-op provider, as
        #: without any exporter): every RPC records them, and a no-op recording still
        #: costs its attribute look-ups and calls. The global provider may be set later,
        #: so it counts as recording.
        self.records_rpcs = not isinstance(meter_provider, metrics.NoOpMeterProvider)
        self._meter = meter
        self.rpc_duration = meter.create_histogram(
            "rpc.server.call.duration",
            unit="s",
            description="Duration of RPCs handled, by method and status code",
            explicit_bucket_boundaries_advisory=RPC_DURATION_BUCKETS,
        )
        self.active_requests = meter.create_up_down_counter(
            "rpc.server.active_requests", unit="{request}", description="RPCs in flight"
        )
        self.rows_ingested = meter.create_counter(
            "ferrule.rows.ingested", unit="{row}", description="Rows written by ingestion RPCs"
        )
        self._method_attributes: dict[str, dict[str, str]] = {}
        self._code_attributes: dict[tuple[str, str], dict[str, str]] = {}

    def _attributes(self, method: str) -> dict[str, str]:
        attributes = self._method_attributes.get(method)
        if attributes is None:
            service, _, rpc = method.lstrip("/").partition("/")
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": rpc}
            if len(self._method_attributes) < 1024:
                self._method_attributes[method] = attributes
        return attributes

    def rpc_started(self, method: str) -> None:
        if self.records_rpcs:
            self.active_requests.add(1, self._attributes(method))

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """``code`` is the status code name (``OK``, ``NOT_FOUND``, ...)."""
        if not self.records_rpcs:
            return
        self.active_requests.add(-1, self._attributes(method))
        key = (method, code)
        attributes = self._code_attributes.get(key)
        if attributes is None:
            attributes = {**self._attributes(method), "rpc.grpc.status_code": code}
            if len(self._code_attributes) < 4096:
                self._code_attributes[key] = attributes
        self.rpc_duration.record(seconds, attributes)

    def record_rows_ingested(self, rows: int, **attributes: str) -> None:
        if rows > 0:
            self.rows_ingested.add(rows, attributes)

    def observe_pool(
        self, status: Callable[[], PoolUsage | Iterable[tuple[str, PoolUsage]]]
    ) -> None:
        """Gauges from ``status()``: one pool, or ``(name, usage)`` pairs (primary, replicas)."""

        def usages() -> list[tuple[str, PoolUsage]]:
            try:
                value = status()
            except Exception:  # a metrics scrape must never fail because of one callback
                log.exception("pool status callback failed")
                return []
            if isinstance(value, Iterable):
                return list(value)
            return [("primary", value)]

        def gauge(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(_options: CallbackOptions) -> Iterable[Observation]:
                return [
                    Observation(int(getattr(usage, field)), {"pool.name": name})
                    for name, usage in usages()
                ]

            return callback

        self._meter.create_observable_gauge(
            "ferrule.db.pool.size", [gauge("size")], unit="{connection}",
            description="Configured pool size",
        )  # fmt: skip
        self._meter.create_observable_gauge(
            "ferrule.db.pool.checked_out", [gauge("checked_out")], unit="{connection}",
            description="Connections in use",
        )  # fmt: skip
        self._meter.create_observable_gauge(
            "ferrule.db.pool.overflow", [gauge("overflow")], unit="{connection}",
            description="Connections open beyond the pool size",
        )  # fmt: skip

    def observe_cache(self, counts: Callable[[], CacheCounts]) -> None:
        """Cumulative hit and miss counters from ``counts()`` (hit rate = hits / both),
        the hits the near cache served from memory (a part of the hits), and its gauges."""

        def observed(field: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
            def callback(_options: CallbackOptions) -> Iterable[Observation]:
                try:
                    return [Observation(int(getattr(counts(), field)))]
                except Exception:
                    log.exception("cache counts callback failed")
                    return []

            return callback

        for name, field, unit, description in _CACHE_COUNTERS:
            self._meter.create_observable_counter(
                name, [observed(field)], unit=unit, description=description
            )
        for name, field, unit, description in _CACHE_GAUGES:
            self._meter.create_observable_gauge(
                name, [observed(field)], unit=unit, description=description
            )


#: (instrument, CacheCounts field, unit, description)
_CACHE_COUNTERS = (
    ("ferrule.cache.hits", "hits", "{lookup}", "Cache hits"),
    ("ferrule.cache.misses", "misses", "{lookup}", "Cache misses"),
    (
        "ferrule.cache.near_hits",
        "near_hits",
        "{lookup}",
        "Cache hits served from process memory, without a Redis round trip",
    ),
)
_CACHE_GAUGES = (
    ("ferrule.cache.near_entries", "near_entries", "{entry}", "Values the near cache holds"),
    (
        "ferrule.cache.near_tracking",
        "near_tracking",
        "",
        "1 while Redis tracks this process's near cache (0: it is bypassed)",
    ),
)


_default: ServerMetrics | None = None


def default_metrics() -> ServerMetrics:
    """The process's metrics: those installed by setup_telemetry, else global-provider ones."""
    global _default
    if _default is None:
        _default = ServerMetrics()
    return _default


def use_metrics(server_metrics: ServerMetrics | None) -> None:
    """Make ``server_metrics`` the process default (None: back to the global provider)."""
    global _default
    _default = server_metrics


def record_rows_ingested(rows: int, **attributes: str) -> None:
    """Count rows committed by an ingestion path (e.g. ``kind="prediction"``)."""
    default_metrics().record_rows_ingested(rows, **attributes)
