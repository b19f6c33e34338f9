"""Builds the cache the server uses from its settings."""

from __future__ import annotations

from opentelemetry import trace

from db.cache.breaker import CircuitBreaker
from db.cache.cache import Cache
from db.cache.local_backend import LocalBackend
from db.cache.redis_backend import RedisBackend
from db.cache.redis_client import RedisConnectionConfig


def create_cache(
    redis: RedisConnectionConfig | str | None,
    *,
    prefix: str,
    timeout_ms: int,
    local_max_entries: int,
    near_cache: bool = True,
    near_max_entries: int = 10_000,
    near_ttl_s: float = 60.0,
    breaker_failures: int = 5,
    breaker_cooldown_s: float = 2.0,
    lease_ms: int = 2_000,
    lock_wait_ms: int = 250,
    invalidation_retry_ms: int = 1_000,
    tracer_provider: trace.TracerProvider | None = None,
) -> Cache:
    """Redis when ``redis`` is set (a URL or a full connection config), fronted by a
    near cache unless ``near_cache`` is false; else the in-process LRU (the embedded
    default).

    No connection is made here (the first call connects), so this is safe to call
    before the event loop runs; call it in each worker process after the fork.
    """
    if redis:
        backend: RedisBackend | LocalBackend = RedisBackend(
            redis,
            timeout_ms=timeout_ms,
            breaker=CircuitBreaker(
                failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s
            ),
            prefix=prefix,
            near_cache=near_cache,
            near_max_entries=near_max_entries,
            near_ttl_s=near_ttl_s,
        )
    else:
        backend = LocalBackend(local_max_entries)
    return Cache(
        backend,
        prefix=prefix,
        lease_ms=lease_ms,
        lock_wait_ms=lock_wait_ms,
        invalidation_retry_ms=invalidation_retry_ms,
        tracer_provider=tracer_provider,
    )
