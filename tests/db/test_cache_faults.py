"""The cache when Redis dies, hangs or never existed: callers never see it fail.

Each test runs its own redis-server on a free port, so it can kill (SIGKILL), hang
(SIGSTOP) and restart it without touching the shared Redis.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from db.cache import Cache, CacheKey, create_cache
from tests.db.cache_fixtures import RedisProcess, free_port
from tests.polling import DEADLINE_S

TIMEOUT_MS = 50
#: Bound for a call while Redis is down or hung. It tells a call bounded by the per-call
#: timeout from one that waits on a dead or hung connection (which waits for ever); the
#: forty-fold margin is for a machine whose cores are busy with other work, not a
#: latency target (latency is measured in `make bench`).
OUTAGE_BOUND_S = 40 * TIMEOUT_MS / 1000
COOLDOWN_S = 0.3


def make_cache(url: str) -> Cache:
    return create_cache(
        url,
        prefix="fault",
        timeout_ms=TIMEOUT_MS,
        local_max_entries=1,
        breaker_failures=3,
        breaker_cooldown_s=COOLDOWN_S,
    )


def key(i: int) -> CacheKey:
    return CacheKey("user", "org-1", f"organizations/org-1/users/u{i}")


def loader(value: bytes) -> Callable[[], Awaitable[bytes]]:
    async def load() -> bytes:
        return value

    return load


async def timed_read(cache: Cache, i: int, value: bytes) -> float:
    """One read that must return ``value``; its duration in seconds."""
    started = time.monotonic()
    assert await cache.get_or_load(key(i), loader(value), ttl=60) == value
    return time.monotonic() - started


async def wait_until_recovered(cache: Cache, read: Callable[[], Awaitable[float]]) -> None:
    """Keep reading (every read must still be right) until the cache is healthy again."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        await read()
        if not cache.stats().degraded:
            return
        assert time.monotonic() < deadline, f"cache did not recover: {cache.stats()}"
        await asyncio.sleep(0.05)


async def test_redis_killed_mid_burst_then_restarted(own_redis: RedisProcess) -> None:
    cache = make_cache(own_redis.url)
    values = {i: f"user-{i}".encode() for i in range(20)}
    try:
        for i, value in values.items():
            await timed_read(cache, i, value)
        assert cache.stats().loads == 20

        after_kill: list[float] = []
        for wave in range(10):
            if wave == 3:
                own_redis.kill()
            durations = await asyncio.gather(
                *(timed_read(cache, i % 20, values[i % 20]) for i in range(40))
            )
            if wave > 3:
                after_kill += durations
        stats = cache.stats()
        assert stats.degraded, stats
        assert stats.errors >= 3, stats
        assert stats.bypassed > 0, stats
        assert not await cache.ping()
        after_kill.sort()
        assert after_kill[int(len(after_kill) * 0.99)] < OUTAGE_BOUND_S, after_kill[-5:]

        # While the breaker is open a call does not even try Redis.
        errors_before = cache.stats().errors
        for i in range(20):
            assert await timed_read(cache, i, values[i]) < OUTAGE_BOUND_S
        assert cache.stats().errors - errors_before <= 3

        own_redis.start()  # same port, empty
        await wait_until_recovered(cache, lambda: timed_read(cache, 0, values[0]))
        hits_before = cache.stats().hits
        for _ in range(3):
            await timed_read(cache, 0, values[0])
        assert cache.stats().hits > hits_before
        assert await cache.ping()
    finally:
        await cache.close()


async def test_hung_redis_invalidation_is_replayed_before_reads_resume(
    own_redis: RedisProcess,
) -> None:
    cache = make_cache(own_redis.url)
    try:
        await timed_read(cache, 1, b"v1")
        await timed_read(cache, 1, b"v1")
        assert cache.stats().hits == 1
        generation = await cache.generation("org-1")

        own_redis.pause()
        # A write commits; its invalidation and generation bump cannot reach Redis.
        started = time.monotonic()
        await cache.invalidate(key(1))
        await cache.bump("org-1")
        assert time.monotonic() - started < 2 * OUTAGE_BOUND_S
        stats = cache.stats()
        assert stats.degraded, stats
        assert stats.pending_invalidations == 3, stats  # entry, its lease, the counter
        for _ in range(10):
            assert await timed_read(cache, 1, b"v2") < OUTAGE_BOUND_S
        assert await cache.generation("org-1") < 0  # unknown: statistics are loaded

        own_redis.resume()
        # Redis still holds the stale v1; no read may return it.
        await wait_until_recovered(cache, lambda: timed_read(cache, 1, b"v2"))
        assert cache.stats().pending_invalidations == 0
        assert await cache.generation("org-1") == generation + 1
        hits_before = cache.stats().hits
        await timed_read(cache, 1, b"v2")
        await timed_read(cache, 1, b"v2")
        assert cache.stats().hits > hits_before
    finally:
        await cache.close()


async def test_redis_never_reachable() -> None:
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    try:
        for i in range(10):
            assert await timed_read(cache, i, b"from-db") < OUTAGE_BOUND_S
        await cache.invalidate(key(1))
        stats = cache.stats()
        assert stats.degraded
        assert stats.loads == 10
        assert stats.hits == 0
        assert not await cache.ping()
    finally:
        await cache.close()


async def test_single_flight_holds_during_an_outage() -> None:
    cache = make_cache(f"redis://127.0.0.1:{free_port()}/0")
    calls = 0
    gate = asyncio.Event()

    async def slow_load() -> bytes:
        nonlocal calls
        calls += 1
        await gate.wait()
        return b"from-db"

    try:
        reads = [
            asyncio.create_task(cache.get_or_load(key(1), slow_load, ttl=60)) for _ in range(30)
        ]
        for _ in range(200):  # until every read has missed the cache and joined the load
            if cache.stats().bypassed >= 30:
                break
            await asyncio.sleep(0.01)
        gate.set()
        assert await asyncio.gather(*reads) == [b"from-db"] * 30
        assert calls == 1
    finally:
        await cache.close()
