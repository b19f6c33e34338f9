"""Builds the cache the server uses from its settings."""

from __future__ import annotations

from opentelemetry import trace

from db.cache.breaker import CircuitBreaker
from db.cache.cache import Cache
from db.cache.local_backend import LocalBackend
from db.cache.redis_backend import RedisBackend


def create_cache(
    redis_url: str | None,
    *,
    prefix: str,
    timeout_ms: int,
    local_max_entries: int,
    breaker_failures: int = 5,
    breaker_cooldown_s: float = 2.0,
    lease_ms: int = 2_000,
    lock_wait_ms: int = 250,
    tracer_provider: trace.TracerProvider | None = None,
) -> Cache:
    """Redis when ``redis_url`` is set, else the in-process LRU (the embedded default).

    No connection is made here (the first call connects), so this is safe to call
    before the event loop runs; call it in each worker process after the fork.
    """
    if redis_url:
        backend: RedisBackend | LocalBackend = RedisBackend(
            redis_url,
            timeout_ms=timeout_ms,
            breaker=CircuitBreaker(
                failure_threshold=breaker_failures, cooldown_s=breaker_cooldown_s
            ),
        )
    else:
        backend = LocalBackend(local_max_entries)
    return Cache(
        backend,
        prefix=prefix,
        lease_ms=lease_ms,
        lock_wait_ms=lock_wait_ms,
        tracer_provider=tracer_provider,
    )
