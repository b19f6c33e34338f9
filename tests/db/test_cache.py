"""The read-through cache's semantics, against real Redis and the in-process LRU."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import redis.asyncio as aioredis
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from db.cache import (
    UNKNOWN_GENERATION,
    BreakerState,
    Cache,
    CacheKey,
    CircuitBreaker,
    LocalBackend,
    RedisBackend,
    create_cache,
)
from tests.db.cache_fixtures import SlowProxy
from tests.polling import eventually

TENANT = "org-1"


class CountingLoader:
    """A loader that counts its calls and can be held until released."""

    def __init__(self, value: bytes | None = b"v1", *, gate: asyncio.Event | None = None) -> None:
        self.value = value
        self.calls = 0
        self.gate = gate
        self.error: BaseException | None = None

    async def __call__(self) -> bytes | None:
        self.calls += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return self.value


async def _delete_namespace(redis_url: str, namespace: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{namespace}:*", count=500)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["redis", "local"])
def backend_url(request: pytest.FixtureRequest) -> str | None:
    """The Redis URL, or None for the in-process LRU (resolved outside the event loop,
    since the session-scoped ``redis_url`` fixture is async)."""
    if request.param == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    return None


@pytest.fixture
async def cache(backend_url: str | None, redis_namespace: str) -> AsyncIterator[Cache]:
    cache = create_cache(
        backend_url, prefix=redis_namespace, timeout_ms=500, local_max_entries=1000
    )
    yield cache
    await cache.close()
    if backend_url is not None:
        await _delete_namespace(backend_url, redis_namespace)


def user_key(ident: str = "organizations/org-1/users/u1", tenant: str = TENANT) -> CacheKey:
    return CacheKey("user", tenant, ident)


# -- keys ------------------------------------------------------------------------------


def test_keys_render_namespaced_by_prefix_kind_tenant_and_generation() -> None:
    assert user_key("u1").render("p") == "p:user:org-1:u1"
    assert CacheKey("stats", "org-1", "by-role", 7).render("p") == "p:stats:org-1:g7:by-role"
    assert user_key("u1").render_lease("p") == "p:lease:user:org-1:u1"
    # ident may hold anything (resource names, digests); kind and tenant may not hold ':'.
    assert user_key("a:b").render("p") != CacheKey("user", "org-1", "a").render("p")
    for kind, tenant in (("us:er", "t"), ("user", "o:1")):
        with pytest.raises(ValueError, match="no ':'"):
            CacheKey(kind, tenant, "i")
    with pytest.raises(ValueError, match="reserved"):
        CacheKey("lease", "t", "i")


def test_create_cache_picks_backend_from_url() -> None:
    local = create_cache(None, prefix="p", timeout_ms=50, local_max_entries=10)
    assert isinstance(local.backend, LocalBackend)
    remote = create_cache("redis://127.0.0.1:1/0", prefix="p", timeout_ms=50, local_max_entries=10)
    assert isinstance(remote.backend, RedisBackend)


# -- read-through ----------------------------------------------------------------------


async def test_hit_after_miss_calls_loader_once(cache: Cache) -> None:
    loader = CountingLoader(b"\x00user-bytes\xff")
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"\x00user-bytes\xff"
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"\x00user-bytes\xff"
    assert loader.calls == 1
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.loads, stats.errors) == (1, 1, 1, 0)
    assert stats.hit_rate == pytest.approx(0.5)
    assert not stats.degraded


async def test_keys_of_other_tenants_are_separate(cache: Cache) -> None:
    await cache.get_or_load(user_key(tenant="org-a"), CountingLoader(b"a"), ttl=30)
    other = CountingLoader(b"b")
    assert await cache.get_or_load(user_key(tenant="org-b"), other, ttl=30) == b"b"
    assert other.calls == 1


async def test_empty_bytes_are_a_value(cache: Cache) -> None:
    loader = CountingLoader(b"")
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b""
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b""
    assert loader.calls == 1


async def test_none_is_not_cached(cache: Cache) -> None:
    loader = CountingLoader(None)
    assert await cache.get_or_load(user_key(), loader, ttl=30) is None
    assert await cache.get_or_load(user_key(), loader, ttl=30) is None
    assert loader.calls == 2
    loader.value = b"created"
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"created"


async def test_invalidate_makes_next_read_load_again(cache: Cache) -> None:
    loader = CountingLoader(b"v1")
    await cache.get_or_load(user_key(), loader, ttl=30)
    loader.value = b"v2"
    await cache.invalidate(user_key(), user_key("other"))
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"v2"
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"v2"
    assert loader.calls == 2


async def test_generation_bump_makes_statistics_keys_miss(cache: Cache) -> None:
    loader = CountingLoader(b"stats-1")
    key = await cache.versioned_key("user_stats", TENANT, "all")
    assert key.generation is not None
    assert key.generation >= 0
    await cache.get_or_load(key, loader, ttl=30)
    assert await cache.versioned_key("user_stats", TENANT, "all") == key
    assert await cache.get_or_load(key, loader, ttl=30) == b"stats-1"
    assert loader.calls == 1

    other_tenant = await cache.versioned_key("user_stats", "org-2", "all")
    await cache.bump(TENANT)
    assert await cache.versioned_key("user_stats", "org-2", "all") == other_tenant

    bumped = await cache.versioned_key("user_stats", TENANT, "all")
    assert bumped.generation == key.generation + 1
    loader.value = b"stats-2"
    assert await cache.get_or_load(bumped, loader, ttl=30) == b"stats-2"
    assert loader.calls == 2


async def test_unknown_generation_is_loaded_never_stored(cache: Cache) -> None:
    key = CacheKey("user_stats", TENANT, "all", UNKNOWN_GENERATION)
    loader = CountingLoader(b"s")
    for _ in range(3):
        assert await cache.get_or_load(key, loader, ttl=30) == b"s"
    assert loader.calls == 3


async def test_ttl_expiry(cache: Cache) -> None:
    loader = CountingLoader(b"short")
    # Long enough that the second read comes first on a busy machine, short enough to wait.
    await cache.get_or_load(user_key(), loader, ttl=2)
    await cache.get_or_load(user_key(), loader, ttl=2)
    assert loader.calls == 1

    async def reloaded() -> bool:
        await cache.get_or_load(user_key(), loader, ttl=2)
        return loader.calls == 2

    await eventually(reloaded, what="the entry expiring", interval=0.1)


async def test_local_lru_bound_holds() -> None:
    cache = Cache(LocalBackend(3), prefix="lru")
    loaders = {i: CountingLoader(f"v{i}".encode()) for i in range(6)}
    for i in range(3):
        await cache.get_or_load(user_key(f"u{i}"), loaders[i], ttl=30)
    await cache.get_or_load(user_key("u0"), loaders[0], ttl=30)  # u0 is now most recent
    for i in range(3, 5):
        await cache.get_or_load(user_key(f"u{i}"), loaders[i], ttl=30)
    backend = cache.backend
    assert isinstance(backend, LocalBackend)
    assert len(backend) == 3
    for i in (0, 3, 4):  # survivors: hits
        await cache.get_or_load(user_key(f"u{i}"), loaders[i], ttl=30)
        assert loaders[i].calls == 1, i
    for i in (1, 2):  # least recently used: evicted
        await cache.get_or_load(user_key(f"u{i}"), loaders[i], ttl=30)
        assert loaders[i].calls == 2, i
    assert len(backend) == 3
    await cache.close()


# -- single-flight ---------------------------------------------------------------------


async def _until(predicate: Callable[[], bool], what: str) -> None:
    await eventually(predicate, what=what, interval=0.005)


async def test_single_flight_50_concurrent_misses_one_load(cache: Cache) -> None:
    gate = asyncio.Event()
    loader = CountingLoader(b"cold", gate=gate)
    calls = [asyncio.create_task(cache.get_or_load(user_key(), loader, ttl=30)) for _ in range(50)]
    await _until(lambda: loader.calls == 1, "the load to start")
    await asyncio.sleep(0.02)  # let every caller reach the flight
    gate.set()
    assert await asyncio.gather(*calls) == [b"cold"] * 50
    assert loader.calls == 1


async def test_failed_load_reaches_every_waiter_and_is_not_cached(cache: Cache) -> None:
    gate = asyncio.Event()
    loader = CountingLoader(b"ok", gate=gate)
    loader.error = RuntimeError("database down")
    calls = [asyncio.create_task(cache.get_or_load(user_key(), loader, ttl=30)) for _ in range(20)]
    await _until(lambda: loader.calls == 1, "the load to start")
    await asyncio.sleep(0.02)
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, RuntimeError) for r in results), results
    assert loader.calls == 1
    loader.error = None
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"ok"
    assert loader.calls == 2


async def test_cancelled_waiter_does_not_cancel_shared_load(cache: Cache) -> None:
    gate = asyncio.Event()
    loader = CountingLoader(b"shared", gate=gate)
    first = asyncio.create_task(cache.get_or_load(user_key(), loader, ttl=30))
    await _until(lambda: loader.calls == 1, "the load to start")
    others = [asyncio.create_task(cache.get_or_load(user_key(), loader, ttl=30)) for _ in range(5)]
    await asyncio.sleep(0.02)
    first.cancel()  # the caller whose call started the load goes away
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    assert await asyncio.gather(*others) == [b"shared"] * 5
    assert loader.calls == 1
    assert await cache.get_or_load(user_key(), loader, ttl=30) == b"shared"
    assert loader.calls == 1


async def test_load_is_cancelled_when_every_waiter_is(cache: Cache) -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def slow_loader() -> bytes:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return b"never"

    calls = [
        asyncio.create_task(cache.get_or_load(user_key(), slow_loader, ttl=30)) for _ in range(3)
    ]
    await asyncio.wait_for(started.wait(), 5)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    await asyncio.wait_for(cancelled.wait(), 5)
    # A new caller starts a fresh load rather than joining the cancelled one.
    assert await cache.get_or_load(user_key(), CountingLoader(b"fresh"), ttl=30) == b"fresh"


async def test_load_racing_an_invalidation_does_not_store_its_stale_value(cache: Cache) -> None:
    gate = asyncio.Event()
    stale = CountingLoader(b"before-write", gate=gate)
    read = asyncio.create_task(cache.get_or_load(user_key(), stale, ttl=30))
    await _until(lambda: stale.calls == 1, "the load to start")
    await cache.invalidate(user_key())  # a write commits while the read is loading
    # The writer reads its write back while the old load is still running: it must not
    # join that load.
    fresh = CountingLoader(b"after-write")
    reread = cache.get_or_load(user_key(), fresh, ttl=30)
    assert await asyncio.wait_for(reread, 5) == b"after-write"
    gate.set()
    assert await read == b"before-write"  # that read began before the write: fine
    assert await cache.get_or_load(user_key(), fresh, ttl=30) == b"after-write"
    assert fresh.calls == 1


# -- across processes (two Redis clients stand for two server processes) ---------------


@pytest.fixture
async def two_processes(redis_url: str, redis_namespace: str) -> AsyncIterator[tuple[Cache, Cache]]:
    caches = tuple(
        create_cache(
            redis_url,
            prefix=redis_namespace,
            timeout_ms=500,
            local_max_entries=1,
            lock_wait_ms=1000,
        )
        for _ in range(2)
    )
    yield caches[0], caches[1]
    for c in caches:
        await c.close()
    await _delete_namespace(redis_url, redis_namespace)


async def test_cross_process_lease_lets_one_process_load(
    two_processes: tuple[Cache, Cache],
) -> None:
    a, b = two_processes
    gate = asyncio.Event()
    loader_a = CountingLoader(b"from-a", gate=gate)
    loader_b = CountingLoader(b"from-b")
    call_a = asyncio.create_task(a.get_or_load(user_key(), loader_a, ttl=30))
    await _until(lambda: loader_a.calls == 1, "process a to load")
    call_b = asyncio.create_task(b.get_or_load(user_key(), loader_b, ttl=30))
    await asyncio.sleep(0.05)  # b is polling for a's value
    gate.set()
    assert await call_a == b"from-a"
    assert await call_b == b"from-a"
    assert loader_b.calls == 0


async def test_cross_process_wait_is_bounded(
    two_processes: tuple[Cache, Cache], redis_url: str, redis_namespace: str
) -> None:
    a, b = two_processes
    # Another process took the lease and then hung.
    claimed = await a.backend.claim(
        user_key().render(redis_namespace), user_key().render_lease(redis_namespace), "hung", 60_000
    )
    assert claimed == (None, True)
    loader = CountingLoader(b"self-loaded")
    assert await asyncio.wait_for(b.get_or_load(user_key(), loader, ttl=30), 10) == b"self-loaded"
    assert loader.calls == 1
    # It loaded without the lease, so it did not store: the lease holder will.
    assert await b.backend.get(user_key().render(redis_namespace)) is None


async def test_cross_process_invalidation_and_bump(two_processes: tuple[Cache, Cache]) -> None:
    a, b = two_processes
    await a.get_or_load(user_key(), CountingLoader(b"v1"), ttl=30)
    assert await b.get_or_load(user_key(), CountingLoader(b"unused"), ttl=30) == b"v1"
    await b.invalidate(user_key())
    assert await a.get_or_load(user_key(), CountingLoader(b"v2"), ttl=30) == b"v2"
    generation = await a.generation(TENANT)
    await b.bump(TENANT)
    assert await a.generation(TENANT) == generation + 1


# -- cancellation never desynchronizes a connection ------------------------------------


async def test_cancelled_commands_never_leave_replies_out_of_step(
    redis_url: str, redis_namespace: str
) -> None:
    """Hundreds of calls cancelled at random points (a slow proxy makes the window between
    a command and its reply wide), all multiplexed on the backend's one connection; every
    later reply must be its own command's. An out-of-step connection hands a GET the value
    of another key."""
    ns = redis_namespace
    n_keys = 40
    setup = aioredis.Redis.from_url(redis_url)
    await setup.mset({f"{ns}:k{i}": f"value-{i}" for i in range(n_keys)})
    await setup.mset({f"{ns}:c{i}": str(1000 + i) for i in range(n_keys)})
    await setup.aclose()
    upstream_port = aioredis.Redis.from_url(redis_url).connection_pool.connection_kwargs["port"]
    # Multiplexed commands do not queue for a pooled connection, so the window has to come
    # from the proxy: 15 ms per hop leaves ~4/5 of the calls cancelled mid-flight.
    proxy = SlowProxy(int(upstream_port), delay_s=0.015)
    await proxy.start()
    backend = RedisBackend(proxy.url, timeout_ms=2000)
    rng = random.Random(1234)

    async def op(i: int, kind: int) -> None:
        if kind == 0:
            assert await backend.get(f"{ns}:k{i}") == f"value-{i}".encode()
        elif kind == 1:
            assert await backend.read_counter(f"{ns}:c{i}", 0) == 1000 + i
        elif kind == 2:  # a claim on a filled key: the value, and a fill that must not land
            lease, token = f"{ns}:lease:k{i}", f"t{rng.random()}"
            value, leased = await backend.claim(f"{ns}:k{i}", lease, token, 5000)
            assert (value, leased) == (f"value-{i}".encode(), False)
            assert not await backend.fill(f"{ns}:k{i}", lease, token, b"never stored", 60_000)
        else:  # a write: claim a cold key and fill it
            lease, token = f"{ns}:lease:w{i}", f"t{rng.random()}"
            value, leased = await backend.claim(f"{ns}:w{i}", lease, token, 5000)
            if leased:
                assert await backend.fill(f"{ns}:w{i}", lease, token, f"w-{i}".encode(), 60_000)
            else:
                assert value in (None, f"w-{i}".encode())  # None: a cancelled claim holds it

    try:
        cancelled = 0
        for _round in range(10):
            tasks = [
                asyncio.create_task(op(rng.randrange(n_keys), rng.randrange(4))) for _ in range(40)
            ]
            await asyncio.sleep(rng.uniform(0, 0.01))
            for task in tasks:
                await asyncio.sleep(rng.uniform(0, 0.0005))
                task.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            cancelled += sum(isinstance(r, asyncio.CancelledError) for r in results)
            failures = [r for r in results if not isinstance(r, asyncio.CancelledError | None)]
            assert not failures, failures
        assert cancelled >= 200, f"only {cancelled} of 400 calls were cancelled mid-flight"
        # Every later reply matches its own key.
        for _ in range(3):
            await asyncio.gather(*(op(i, kind) for i in range(n_keys) for kind in range(4)))
    finally:
        await backend.close()
        await proxy.close()
        await _delete_namespace(redis_url, ns)


async def test_cancelled_cache_calls_keep_the_cache_consistent(
    redis_url: str, redis_namespace: str
) -> None:
    """The same through the front: cancelled get_or_load calls at random points, then every
    key still reads back its own value."""
    cache = create_cache(redis_url, prefix=redis_namespace, timeout_ms=2000, local_max_entries=1)
    rng = random.Random(99)

    def loader_for(i: int) -> Callable[[], Awaitable[bytes]]:
        async def load() -> bytes:
            await asyncio.sleep(rng.uniform(0, 0.002))
            return f"user-{i}".encode()

        return load

    try:
        for _round in range(5):
            tasks = [
                asyncio.create_task(cache.get_or_load(user_key(f"u{i}"), loader_for(i), ttl=30))
                for i in (rng.randrange(30) for _ in range(60))
            ]
            await asyncio.sleep(rng.uniform(0, 0.003))
            for task in tasks[::2]:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for i in range(30):
            assert await cache.get_or_load(user_key(f"u{i}"), loader_for(i), ttl=30) == (
                f"user-{i}".encode()
            )
        assert cache.stats().errors == 0
    finally:
        await cache.close()
        await _delete_namespace(redis_url, redis_namespace)


# -- circuit breaker and spans ---------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_consecutive_failures_and_half_opens_one_probe() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=3, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    breaker.record_failure()
    breaker.record_success()  # not consecutive: the count starts again
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow()
    clock.now += 1.0
    assert breaker.allow()  # the probe
    assert breaker.state.value == BreakerState.HALF_OPEN.value
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()  # the probe failed: another full cool-down
    assert breaker.state is BreakerState.OPEN
    clock.now += 0.5
    assert not breaker.allow()
    clock.now += 0.5
    assert breaker.allow()
    breaker.record_success()
    assert breaker.is_closed
    assert breaker.allow()


def test_breaker_replaces_a_probe_that_never_reports() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(failure_threshold=1, cooldown_s=1.0, clock=clock)
    breaker.record_failure()
    clock.now += 1.0
    assert breaker.allow()
    clock.now += 1.0
    assert breaker.allow()


async def test_cache_calls_are_spans_with_outcome(cache: Cache) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    traced = Cache(cache.backend, prefix=cache.prefix, tracer_provider=provider)
    # Outside a traced RPC (no recording span) cache calls start no trace of their own.
    await traced.get_or_load(user_key(), CountingLoader(b"x"), ttl=30)
    await traced.invalidate(user_key())
    assert exporter.get_finished_spans() == ()
    with provider.get_tracer("test").start_as_current_span("rpc"):
        await traced.get_or_load(user_key(), CountingLoader(b"x"), ttl=30)
        await traced.get_or_load(user_key(), CountingLoader(b"x"), ttl=30)
        await traced.invalidate(user_key())
        await traced.bump(TENANT)
    spans = [s for s in exporter.get_finished_spans() if s.name != "rpc"]
    assert [s.name for s in spans] == [
        "cache get_or_load",
        "cache get_or_load",
        "cache invalidate",
        "cache bump",
    ]
    attributes = [dict(s.attributes or {}) for s in spans]
    assert [a["ferrule.cache.result"] for a in attributes[:2]] == ["miss", "hit"]
    assert all(a["ferrule.tenant"] == TENANT for a in attributes)
