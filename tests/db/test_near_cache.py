"""The near cache in front of Redis: hits cost no Redis command, Redis's invalidations
(CLIENT TRACKING, broadcast mode) keep it fresh across processes, and losing the
listener or Redis flushes it until tracking is back.

Two :class:`Cache` objects with their own connections and listeners stand for two
processes here (tests/server/test_near_cache_processes.py uses real server processes).
Tests that kill connections, restart or flush Redis run their own redis-server.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis

from db.cache import Cache, CacheKey, create_cache
from db.cache.near_cache import NearCache
from db.cache.redis_backend import RedisBackend
from tests.db.cache_fixtures import RedisProcess

PREFIX = "near"


def make_cache(url: str, **overrides: Any) -> Cache:
    options: dict[str, Any] = {"prefix": PREFIX, "timeout_ms": 500, "local_max_entries": 1}
    options.update(overrides)
    return create_cache(url, **options)


def backend_of(cache: Cache) -> RedisBackend:
    backend = cache.backend
    assert isinstance(backend, RedisBackend)
    return backend


async def until(predicate: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def invalidations_reach(near: NearCache, count: int) -> None:
    """Until ``near`` has heard ``count`` invalidations (bounded)."""
    await until(lambda: near.invalidations >= count, f"{count} invalidations", 1.0)


async def tracking(cache: Cache) -> None:
    """Until the cache's listener is subscribed (the first call starts it)."""
    await cache.ping()
    near = backend_of(cache).near
    assert near is not None
    await until(lambda: near.active, "the invalidation listener to subscribe")


@pytest.fixture
async def two(own_redis: RedisProcess) -> AsyncIterator[tuple[Cache, Cache]]:
    a, b = make_cache(own_redis.url), make_cache(own_redis.url)
    await tracking(a)
    await tracking(b)
    yield a, b
    await a.close()
    await b.close()


def key(i: int = 1) -> CacheKey:
    return CacheKey("user", "org-1", f"organizations/org-1/users/u{i}")


class Loader:
    def __init__(self, value: bytes) -> None:
        self.value = value
        self.calls = 0

    async def __call__(self) -> bytes:
        self.calls += 1
        return self.value


def commands_served(admin: redis.Redis) -> dict[str, int]:
    """Calls per command since start (INFO commandstats), minus INFO and the listener's
    keep-alive PING. ``admin`` is connected already, so its handshake is not counted."""
    stats = admin.info("commandstats")
    return {
        name: int(entry["calls"])
        for name, entry in stats.items()
        if name not in ("cmdstat_info", "cmdstat_ping")
    }


async def test_a_hit_after_a_miss_costs_no_redis_command(
    two: tuple[Cache, Cache], own_redis: RedisProcess
) -> None:
    a, _ = two
    loader = Loader(b"user-1")
    stats_key = await a.versioned_key("userstatistics", "users.org-1", "all")
    stats_loader = Loader(b"stats")
    assert await a.get_or_load(key(), loader, ttl=60) == b"user-1"  # the miss
    assert await a.get_or_load(stats_key, stats_loader, ttl=60) == b"stats"
    # Creating the counter was a write: its broadcast evicts the first copy; the next
    # read keeps it.
    near = backend_of(a).near
    assert near is not None
    counter = "near:gen:users.org-1"
    await until(lambda: near.get(counter) is None, "the counter's creation to be heard")
    await a.versioned_key("userstatistics", "users.org-1", "all")
    hits = a.stats().hits
    admin = redis.Redis(port=own_redis.port)
    admin.ping()
    before = commands_served(admin)
    assert sum(before.values()) > 0
    for _ in range(100):
        assert await a.get_or_load(key(), loader, ttl=60) == b"user-1"
        # A statistics read: the generation counter and the entry, both from memory.
        assert await a.versioned_key("userstatistics", "users.org-1", "all") == stats_key
        assert await a.get_or_load(stats_key, stats_loader, ttl=60) == b"stats"
    assert commands_served(admin) == before
    admin.close()
    assert (loader.calls, stats_loader.calls) == (1, 1)
    assert a.stats().hits == hits + 200


async def test_a_write_in_another_process_invalidates_the_near_copy(
    two: tuple[Cache, Cache],
) -> None:
    a, b = two
    near_a = backend_of(a).near
    assert near_a is not None
    for round_ in range(20):
        value = f"v{round_}".encode()
        assert await a.get_or_load(key(), Loader(value), ttl=60) == value
        assert await a.get_or_load(key(), Loader(b"unused"), ttl=60) == value  # near hit
        seen = near_a.invalidations
        await b.invalidate(key())  # b's write committed
        # b's invalidate returned after b's own listener received the broadcast, which
        # Redis sent to a's listener in the same pass.
        await invalidations_reach(near_a, seen + 1)
        fresh = f"v{round_ + 1}".encode()
        assert await a.get_or_load(key(), Loader(fresh), ttl=60) == fresh
        generation = await a.generation("users.org-1")
        await b.bump("users.org-1")
        await invalidations_reach(near_a, seen + 2)
        assert await a.generation("users.org-1") == generation + 1
        await a.invalidate(key())
    for cache in (a, b):  # every write heard its own broadcast (none waited it out)
        listener = backend_of(cache).listener
        assert listener is not None
        assert listener.broadcasts_missed == 0


async def test_a_read_racing_an_invalidation_does_not_keep_its_value(
    two: tuple[Cache, Cache],
) -> None:
    """A value fetched before a write, whose reply is handled after the write's
    invalidation arrived, is returned to its caller but never kept."""
    a, b = two
    near_a = backend_of(a).near
    assert near_a is not None
    rendered = key().render(PREFIX)
    ticket = near_a.begin(rendered)  # a's GET is in flight...
    seen = near_a.invalidations
    await b.invalidate(key())  # ...when b's write invalidates the key
    await until(lambda: near_a.invalidations > seen, "a to hear of b's write")
    assert not near_a.store(ticket, b"stale")
    near_a.end(ticket)
    assert near_a.get(rendered) is None
    assert near_a.pending_tickets == 0


async def test_listener_killed_no_stale_read_then_tracking_resumes(
    two: tuple[Cache, Cache], own_redis: RedisProcess
) -> None:
    a, b = two
    backend = backend_of(a)
    near, listener = backend.near, backend.listener
    assert near is not None
    assert listener is not None
    assert await a.get_or_load(key(), Loader(b"old"), ttl=60) == b"old"
    assert await a.get_or_load(key(), Loader(b"unused"), ttl=60) == b"old"
    with redis.Redis(port=own_redis.port) as admin:
        assert admin.client_kill_filter(_id=listener.client_id) == 1
        # While a's listener is gone, b writes: a must not serve its near copy.
        await b.invalidate(key())
    assert await a.get_or_load(key(), Loader(b"new"), ttl=60) == b"new"
    await until(lambda: listener.subscriptions == 2, "the listener to subscribe again")
    assert await a.get_or_load(key(), Loader(b"newer"), ttl=60) == b"new"
    hits = near.hits
    assert await a.get_or_load(key(), Loader(b"unused"), ttl=60) == b"new"
    assert near.hits == hits + 1  # served from memory again


async def test_redis_restarted_flushes_then_hits_resume(own_redis: RedisProcess) -> None:
    cache = make_cache(own_redis.url, breaker_cooldown_s=0.2)
    try:
        await tracking(cache)
        near = backend_of(cache).near
        assert near is not None
        assert await cache.get_or_load(key(), Loader(b"v1"), ttl=60) == b"v1"
        own_redis.kill()
        await until(lambda: not near.active, "the listener to notice")
        assert len(near) == 0
        # Redis is gone: the database answers.
        assert await cache.get_or_load(key(), Loader(b"v2"), ttl=60) == b"v2"
        own_redis.start()  # same port, empty
        await until(lambda: near.active, "tracking to be re-established", 10)
        for _ in range(100):
            await cache.get_or_load(key(), Loader(b"v3"), ttl=60)
            if not cache.stats().degraded and near.hits > 0:
                break
            await asyncio.sleep(0.05)
        hits = near.hits
        assert await cache.get_or_load(key(), Loader(b"unused"), ttl=60) == b"v3"
        assert near.hits == hits + 1
    finally:
        await cache.close()


async def test_flushdb_flushes_the_near_cache(
    two: tuple[Cache, Cache], own_redis: RedisProcess
) -> None:
    a, _ = two
    near = backend_of(a).near
    assert near is not None
    await a.get_or_load(key(), Loader(b"v1"), ttl=60)
    assert len(near) == 1
    flushes = near.flushes
    with redis.Redis(port=own_redis.port) as admin:
        admin.flushdb()
    await until(lambda: near.flushes > flushes, "the flush to be broadcast")
    assert len(near) == 0
    assert await a.get_or_load(key(), Loader(b"v2"), ttl=60) == b"v2"


async def test_ttl_backstop_and_lru_bound(own_redis: RedisProcess) -> None:
    cache = make_cache(own_redis.url, near_ttl_s=0.3, near_max_entries=3)
    try:
        await tracking(cache)
        near = backend_of(cache).near
        assert near is not None
        for i in range(5):
            await cache.get_or_load(key(i), Loader(f"v{i}".encode()), ttl=60)
        assert len(near) == 3  # the two least recently used went
        # Behind the cache's back (no invalidation marker): only the TTL ends the copy.
        with redis.Redis(port=own_redis.port) as admin:
            admin.set(key(4).render(PREFIX), b"changed")
        assert await cache.get_or_load(key(4), Loader(b"unused"), ttl=60) == b"v4"
        await asyncio.sleep(0.35)
        assert await cache.get_or_load(key(4), Loader(b"unused"), ttl=60) == b"changed"
    finally:
        await cache.close()


async def test_a_process_without_a_near_cache_still_invalidates_the_others(
    own_redis: RedisProcess,
) -> None:
    with_near, without = make_cache(own_redis.url), make_cache(own_redis.url, near_cache=False)
    try:
        await tracking(with_near)
        assert backend_of(without).near is None
        near = backend_of(with_near).near
        assert near is not None
        assert await with_near.get_or_load(key(), Loader(b"old"), ttl=60) == b"old"
        assert near.get(key().render(PREFIX)) == b"old"
        seen = near.invalidations
        await without.invalidate(key())
        await invalidations_reach(near, seen + 1)
        assert await with_near.get_or_load(key(), Loader(b"new"), ttl=60) == b"new"
    finally:
        await with_near.close()
        await without.close()


async def _invalidate_while_redis_holds_writes(
    own_redis: RedisProcess, **writer_options: Any
) -> tuple[Cache, Cache, int]:
    """Process a caches a value (near copy tracked); then, while Redis holds every write
    for longer than one call's timeout (reads go on), process b (``writer_options``)
    invalidates it, as after its write committed. Returns both caches, open, and how many
    invalidations a's near cache had heard before b's."""
    a = make_cache(own_redis.url, timeout_ms=50)
    b = make_cache(own_redis.url, timeout_ms=50, **writer_options)
    await tracking(a)
    await tracking(b)
    assert await a.get_or_load(key(), Loader(b"old"), ttl=60) == b"old"
    near_a = backend_of(a).near
    assert near_a is not None
    seen = near_a.invalidations
    with redis.Redis(port=own_redis.port) as admin:
        admin.execute_command("CLIENT", "PAUSE", 120, "WRITE")
        await b.invalidate(key())
    return a, b, seen


async def test_a_write_whose_invalidation_times_out_once_retries_before_it_answers(
    own_redis: RedisProcess,
) -> None:
    """On a busy machine one cache call can exceed the timeout. A read then just goes to
    the database, but a write that gave up on its invalidation would leave the other
    processes serving the old value (from Redis and their near caches) until it replays
    it, after the write answered: the invalidation is retried before the write answers."""
    a, b, seen = await _invalidate_while_redis_holds_writes(own_redis)
    try:
        near_a = backend_of(a).near
        assert near_a is not None
        assert b.stats().pending_invalidations == 0
        await invalidations_reach(near_a, seen + 1)
        assert await a.get_or_load(key(), Loader(b"new"), ttl=60) == b"new"
    finally:
        await a.close()
        await b.close()


async def test_without_invalidation_retries_a_timed_out_invalidation_is_left_for_replay(
    own_redis: RedisProcess,
) -> None:
    """``invalidation_retry_ms`` (FERRULE_CACHE_INVALIDATION_RETRY_MS) is what makes the
    write above wait: at 0 the one attempt that timed out is all, and the invalidation
    waits for the background replay after the write has answered."""
    a, b, _ = await _invalidate_while_redis_holds_writes(own_redis, invalidation_retry_ms=0)
    try:
        assert b.stats().pending_invalidations > 0
    finally:
        await a.close()
        await b.close()
