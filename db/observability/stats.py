"""In-process query statistics and the slow-query digest.

Both are bounded (recent-window rings for percentiles, a cap on distinct statements) so
that a long-running process or a flood of distinct statements cannot grow them. All
methods are thread-safe; the hot path takes one uncontended lock.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

__all__ = [
    "QueryStatistics",
    "QueryStatisticsSnapshot",
    "SlowQueryDigest",
    "SlowQueryEntry",
    "SlowQueryOrder",
    "percentile",
]

SlowQueryOrder = Literal["total", "p99", "p50", "max", "count", "mean"]


def percentile(values: Iterable[float], fraction: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(frozen=True, slots=True)
class QueryStatisticsSnapshot:
    total: int
    failed: int
    slow: int
    error_rate: float
    mean_ms: float
    #: Over the most recent ``window`` statements.
    p99_ms: float
    max_ms: float
    since: datetime


class QueryStatistics:
    """Counts and timings of every observed statement since start (or the last reset)."""

    def __init__(self, window: int = 4096) -> None:
        self._lock = threading.Lock()
        self._window = window
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._total = 0
            self._failed = 0
            self._slow = 0
            self._sum_ms = 0.0
            self._max_ms = 0.0
            self._recent: deque[float] = deque(maxlen=self._window)
            self._since = datetime.now(UTC)

    def record(self, duration_ms: float, *, failed: bool = False, slow: bool = False) -> None:
        with self._lock:
            self._total += 1
            self._failed += failed
            self._slow += slow
            self._sum_ms += duration_ms
            self._max_ms = max(duration_ms, self._max_ms)
            self._recent.append(duration_ms)

    def snapshot(self) -> QueryStatisticsSnapshot:
        with self._lock:
            total, failed, slow = self._total, self._failed, self._slow
            mean = self._sum_ms / total if total else 0.0
            recent = list(self._recent)
            maximum, since = self._max_ms, self._since
        return QueryStatisticsSnapshot(
            total=total,
            failed=failed,
            slow=slow,
            error_rate=failed / total if total else 0.0,
            mean_ms=mean,
            p99_ms=percentile(recent, 0.99),
            max_ms=maximum,
            since=since,
        )


@dataclass(frozen=True, slots=True)
class SlowQueryEntry:
    """One normalized statement's slow executions."""

    statement: str
    operation: str
    count: int
    errors: int
    total_ms: float
    mean_ms: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    first_seen: datetime
    last_seen: datetime
    #: Most recent distinct trace ids, newest last.
    trace_ids: tuple[str, ...]
    #: (rpc method, slow executions) pairs, most frequent first; "" for no RPC.
    rpc_methods: tuple[tuple[str, int], ...]
    #: Most recent distinct tenants, newest last.
    tenants: tuple[str, ...]
    #: ``EXPLAIN (FORMAT JSON)`` output when captured (PostgreSQL, opt-in).
    plan: Any | None
    plan_captured_at: datetime | None


class _Entry:
    __slots__ = (
        "count",
        "durations",
        "errors",
        "first_seen",
        "last_seen",
        "max_ms",
        "methods",
        "operation",
        "plan",
        "plan_captured_at",
        "tenants",
        "total_ms",
        "trace_ids",
    )

    def __init__(self, operation: str, window: int, samples: int, now: datetime) -> None:
        self.operation = operation
        self.count = 0
        self.errors = 0
        self.total_ms = 0.0
        self.max_ms = 0.0
        self.durations: deque[float] = deque(maxlen=window)
        self.trace_ids: deque[str] = deque(maxlen=samples)
        self.tenants: deque[str] = deque(maxlen=samples)
        self.methods: dict[str, int] = {}
        self.first_seen = now
        self.last_seen = now
        self.plan: Any | None = None
        self.plan_captured_at: datetime | None = None


def _remember(ring: deque[str], value: str | None) -> None:
    if not value:
        return
    if value in ring:
        ring.remove(value)
    ring.append(value)


class SlowQueryDigest:
    """Slow statements grouped by normalized text: the data behind the slow-query report."""

    _ORDER_KEYS: dict[str, str] = {
        "total": "total_ms",
        "p99": "p99_ms",
        "p50": "p50_ms",
        "max": "max_ms",
        "count": "count",
        "mean": "mean_ms",
    }

    def __init__(
        self,
        *,
        max_statements: int = 256,
        samples: int = 5,
        window: int = 512,
        max_methods: int = 16,
    ) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._max_statements = max_statements
        self._samples = samples
        self._window = window
        self._max_methods = max_methods

    def record(
        self,
        statement: str,
        operation: str,
        duration_ms: float,
        *,
        trace_id: str | None = None,
        rpc_method: str | None = None,
        tenant: str | None = None,
        failed: bool = False,
    ) -> None:
        now = datetime.now(UTC)
        with self._lock:
            entry = self._entries.get(statement)
            if entry is None:
                if len(self._entries) >= self._max_statements:
                    # Keep the statements that cost the most; drop the cheapest.
                    cheapest = min(self._entries, key=lambda key: self._entries[key].total_ms)
                    del self._entries[cheapest]
                entry = self._entries[statement] = _Entry(
                    operation, self._window, self._samples, now
                )
            entry.count += 1
            entry.errors += failed
            entry.total_ms += duration_ms
            entry.max_ms = max(entry.max_ms, duration_ms)
            entry.durations.append(duration_ms)
            entry.last_seen = now
            _remember(entry.trace_ids, trace_id)
            _remember(entry.tenants, tenant)
            method = rpc_method or ""
            if method in entry.methods or len(entry.methods) < self._max_methods:
                entry.methods[method] = entry.methods.get(method, 0) + 1

    def attach_plan(self, statement: str, plan: Any) -> bool:
        """Attach an EXPLAIN plan; False if the statement is no longer in the digest."""
        with self._lock:
            entry = self._entries.get(statement)
            if entry is None:
                return False
            entry.plan = plan
            entry.plan_captured_at = datetime.now(UTC)
            return True

    def reset(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, statement: str) -> SlowQueryEntry | None:
        with self._lock:
            entry = self._entries.get(statement)
            return None if entry is None else self._freeze(statement, entry)

    def top(self, n: int = 10, order_by: SlowQueryOrder = "total") -> list[SlowQueryEntry]:
        """The ``n`` worst statements by total time (default), p99, p50, max, count or mean."""
        key = self._ORDER_KEYS.get(order_by)
        if key is None:
            raise ValueError(f"order_by must be one of {sorted(self._ORDER_KEYS)}")
        with self._lock:
            frozen = [self._freeze(s, e) for s, e in self._entries.items()]
        frozen.sort(key=lambda entry: getattr(entry, key), reverse=True)
        return frozen[: max(n, 0)]

    @staticmethod
    def _freeze(statement: str, entry: _Entry) -> SlowQueryEntry:
        durations = list(entry.durations)
        methods = sorted(entry.methods.items(), key=lambda item: (-item[1], item[0]))
        return SlowQueryEntry(
            statement=statement,
            operation=entry.operation,
            count=entry.count,
            errors=entry.errors,
            total_ms=entry.total_ms,
            mean_ms=entry.total_ms / entry.count if entry.count else 0.0,
            p50_ms=percentile(durations, 0.50),
            p99_ms=percentile(durations, 0.99),
            max_ms=entry.max_ms,
            first_seen=entry.first_seen,
            last_seen=entry.last_seen,
            trace_ids=tuple(entry.trace_ids),
            rpc_methods=tuple(methods),
            tenants=tuple(entry.tenants),
            plan=entry.plan,
            plan_captured_at=entry.plan_captured_at,
        )
