"""ferrule.v1.HealthService: the detailed health report and the slow-query report.

Unlike grpc.health.v1 (a yes/no for load balancers), this tells an operator why: the
database (latency, version, pool), the cache, the schema revision, the process and the
statement statistics. It always answers OK; the report's status says how healthy.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime
from typing import cast, get_args

import grpc
import psutil

from db.errors import DomainError
from db.migrate import current_revision, head_revision
from db.observability import SlowQueryOrder
from ferrule import __version__
from ferrule.v1 import health_service_pb2 as pb
from ferrule.v1 import health_service_pb2_grpc
from server.dependencies import Dependencies
from server.violations import Violations

_STARTED = time.monotonic()
_START_TIME = datetime.now(UTC)
PING_TIMEOUT_SECONDS = 2.0
DEFAULT_TOP_N = 10
MAX_TOP_N = 100


class HealthServicer(health_service_pb2_grpc.HealthServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self._head = head_revision()

    async def GetHealthReport(
        self, request: pb.GetHealthReportRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> pb.HealthReport:
        report = pb.HealthReport()
        report.check_time.FromDatetime(datetime.now(UTC))
        database_ok = await self._database(report.database)
        schema_ok = await self._schema(report.schema, database_ok)
        cache_ok = await self._cache(report.cache)
        self._process(report.process)
        self._query_statistics(report.query_statistics)
        if not database_ok:
            report.status = pb.HEALTH_STATUS_UNHEALTHY
        elif not (schema_ok and cache_ok):
            report.status = pb.HEALTH_STATUS_DEGRADED
        else:
            report.status = pb.HEALTH_STATUS_HEALTHY
        return report

    async def _database(self, out: pb.DatabaseHealth) -> bool:
        database = self._deps.database
        out.dialect = database.dialect_name
        pool = database.pool_status()
        out.pool_size, out.pool_checked_out, out.pool_overflow = (
            pool.size,
            pool.checked_out,
            pool.overflow,
        )
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                ping = await database.ping()
        except (DomainError, TimeoutError, OSError):
            out.reachable = False
            return False
        out.reachable = True
        out.latency.FromNanoseconds(int(ping.latency_seconds * 1e9))
        out.server_version = ping.server_version
        return True

    async def _schema(self, out: pb.SchemaHealth, database_ok: bool) -> bool:
        out.head_revision = self._head
        if not database_ok:
            return False
        try:
            async with asyncio.timeout(PING_TIMEOUT_SECONDS):
                current = await current_revision(self._deps.database.engine)
        except (DomainError, TimeoutError, OSError):
            return False
        out.current_revision = current or ""
        out.up_to_date = current == self._head
        return out.up_to_date

    async def _cache(self, out: pb.CacheHealth) -> bool:
        cache = self._deps.cache
        out.reachable = await cache.ping()
        stats = cache.stats()
        out.backend = stats.backend
        out.degraded = stats.degraded or not out.reachable
        out.hits, out.misses, out.hit_rate = stats.hits, stats.misses, stats.hit_rate
        out.near_hits, out.near_entries = stats.near_hits, stats.near_entries
        out.near_tracking = stats.near_tracking
        return not out.degraded

    def _process(self, out: pb.ProcessInfo) -> None:
        out.version = __version__
        out.pid = os.getpid()
        out.rss_bytes = psutil.Process().memory_info().rss
        out.uptime.FromNanoseconds(int((time.monotonic() - _STARTED) * 1e9))
        out.start_time.FromDatetime(_START_TIME)

    def _query_statistics(self, out: pb.QueryStatistics) -> None:
        stats = self._deps.query_observers.statistics.snapshot()
        out.total_count, out.failed_count, out.slow_count = stats.total, stats.failed, stats.slow
        out.error_rate = stats.error_rate
        out.mean_duration.FromNanoseconds(int(stats.mean_ms * 1e6))
        out.p99_duration.FromNanoseconds(int(stats.p99_ms * 1e6))

    async def GetSlowQueryReport(
        self,
        request: pb.GetSlowQueryReportRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.SlowQueryReport:
        order_by = request.order_by or "total"
        v = Violations()
        v.check(
            order_by in get_args(SlowQueryOrder),
            "order_by",
            f"one of {', '.join(get_args(SlowQueryOrder))}",
        )
        v.check(request.top_n >= 0, "top_n", "must not be negative")
        v.raise_if_any()
        top_n = min(request.top_n or DEFAULT_TOP_N, MAX_TOP_N)
        digest = self._deps.query_observers.slow_queries
        report = pb.SlowQueryReport()
        report.threshold.FromNanoseconds(int(self._deps.settings.ferrule_slow_query_ms * 1e6))
        report.since_time.FromDatetime(self._deps.query_observers.statistics.snapshot().since)
        for entry in digest.top(top_n, order_by=cast(SlowQueryOrder, order_by)):
            out = report.entries.add(
                statement=entry.statement,
                count=entry.count,
                sample_trace_ids=list(entry.trace_ids),
                rpc_methods=[method for method, _ in entry.rpc_methods if method],
            )
            for field, ms in (
                ("total_duration", entry.total_ms),
                ("p50_duration", entry.p50_ms),
                ("p99_duration", entry.p99_ms),
                ("max_duration", entry.max_ms),
            ):
                getattr(out, field).FromNanoseconds(int(ms * 1e6))
            out.last_seen_time.FromDatetime(entry.last_seen)
            if request.include_explain_plans and entry.plan is not None:
                out.explain_plan = json.dumps(entry.plan)
        return report

    async def ResetSlowQueryReport(
        self,
        request: pb.ResetSlowQueryReportRequest,
        context: grpc.aio.ServicerContext[object, object],
    ) -> pb.ResetSlowQueryReportResponse:
        digest = self._deps.query_observers.slow_queries
        cleared = len(digest)
        digest.reset()
        return pb.ResetSlowQueryReportResponse(cleared_entry_count=cleared)


def add_to_server(server: grpc.aio.Server, deps: Dependencies) -> str:
    health_service_pb2_grpc.add_HealthServiceServicer_to_server(HealthServicer(deps), server)
    return "ferrule.v1.HealthService"
