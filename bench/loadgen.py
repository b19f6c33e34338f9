"""Closed-loop unary load through the real client, and what the read scenarios share.

``run_load`` keeps ``concurrency`` calls in flight on one channel for ``seconds`` and
returns calls/s, latency percentiles and the CPU the server and this (client) process
used meanwhile, so a figure says which side was the limit. Seeding users goes straight
to the database (one multi-row INSERT), because creating 10,000 users through the API
would take longer than the measurement.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import os
import random
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import psutil
from sqlalchemy import insert

from bench.harness import ServerProcess
from db.engine import Database, DatabaseConfig
from db.models import User, UserProfile, new_id
from db.models.enums import AuthProvider
from db.tenancy import Tenant
from ferrule.v1 import health_service_pb2 as health_pb

Call = Callable[[int], Awaitable[object]]


@dataclass(frozen=True)
class LoadResult:
    calls: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    #: CPU seconds per wall second (1.0 = one core busy) of the server and of this process.
    server_cpu: float
    client_cpu: float

    @property
    def rps(self) -> float:
        return self.calls / self.seconds


def process_cpu_seconds(process: psutil.Process) -> float:
    """CPU of the process and of its live children (a server's workers, or any helper
    process it starts): work moved to a child is still the server's cost."""
    total = 0.0
    for member in (process, *process.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


async def run_load(
    call: Call,
    *,
    seconds: float,
    concurrency: int,
    server_pid: int,
    warmup: float = 0.5,
) -> LoadResult:
    """Call ``call(i)`` (i = 0, 1, 2, ...) from ``concurrency`` workers for ``seconds``."""
    counter = itertools.count()
    latencies: list[float] = []
    errors = 0
    measuring = False
    stop = False
    perf = time.perf_counter

    async def worker() -> None:
        nonlocal errors
        while not stop:
            i = next(counter)
            started = perf()
            try:
                await call(i)
            except Exception:
                errors += 1
                continue
            if measuring:
                latencies.append(perf() - started)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.sleep(warmup)
        server, me = psutil.Process(server_pid), psutil.Process(os.getpid())
        server_cpu, my_cpu = process_cpu_seconds(server), process_cpu_seconds(me)
        measuring = True
        started = perf()
        await asyncio.sleep(seconds)
        measuring = False
        elapsed = perf() - started
        done = len(latencies)
        server_used, my_used = (
            process_cpu_seconds(server) - server_cpu,
            process_cpu_seconds(me) - my_cpu,
        )
    finally:
        stop = True
        await asyncio.gather(*tasks, return_exceptions=True)
    ordered = sorted(latencies[:done])
    return LoadResult(
        calls=done,
        errors=errors,
        seconds=elapsed,
        p50_ms=_percentile(ordered, 0.50) * 1000,
        p99_ms=_percentile(ordered, 0.99) * 1000,
        server_cpu=server_used / elapsed,
        client_cpu=my_used / elapsed,
    )


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def median_result(results: Sequence[LoadResult]) -> LoadResult:
    """The round with the median rate (its latencies and CPU come with it)."""
    ordered = sorted(results, key=lambda r: r.rps)
    return ordered[len(ordered) // 2]


def zipf_indexes(n: int, s: float, count: int, seed: int = 11) -> list[int]:
    """``count`` draws from {0..n-1} with P(k) proportional to 1/(k+1)^s."""
    weights: list[float] = [1.0 / (k + 1) ** s for k in range(n)]
    cumulative = list(itertools.accumulate(weights))
    total = cumulative[-1]
    rng = random.Random(seed)
    return [bisect.bisect_left(cumulative, rng.random() * total) for _ in range(count)]


def zipf_top_share(n: int, s: float, top: int) -> float:
    weights: list[float] = [1.0 / (k + 1) ** s for k in range(n)]
    return sum(weights[:top]) / sum(weights)


async def seed_users(database_url: str, organization: uuid.UUID, count: int) -> list[uuid.UUID]:
    """``count`` federated (password-less) users with profiles, inserted directly."""
    database = Database(DatabaseConfig(url=database_url))
    ids = [new_id() for _ in range(count)]
    users = [
        {
            "id": user_id,
            "organization_id": organization,
            "email": f"user{i}@bench.example.com",
            "username": f"user{i}",
            "full_name": f"Bench User {i}",
            "auth_provider": AuthProvider.GOOGLE,
            "create_by": "bench",
        }
        for i, user_id in enumerate(ids)
    ]
    profiles = [
        {
            "user_id": user_id,
            "organization_id": organization,
            "bio": "benchmark user",
            "locale": "en-GB",
            "time_zone": "Europe/London",
        }
        for user_id in ids
    ]
    try:
        for start in range(0, count, 2000):
            async with database.transaction(Tenant.all()) as session:
                await session.execute(insert(User), users[start : start + 2000])
                await session.execute(insert(UserProfile), profiles[start : start + 2000])
    finally:
        await database.dispose()
    return ids


@dataclass(frozen=True)
class CacheCounters:
    hits: int
    misses: int
    backend: str

    def rate_since(self, before: CacheCounters) -> float:
        hits, misses = self.hits - before.hits, self.misses - before.misses
        return hits / (hits + misses) if hits + misses else 0.0


async def cache_counters(server: ServerProcess) -> CacheCounters:
    async with server.client() as admin:
        report = await admin.health.GetHealthReport(health_pb.GetHealthReportRequest())
    cache = report.cache
    return CacheCounters(hits=cache.hits, misses=cache.misses, backend=cache.backend)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else 0.0
