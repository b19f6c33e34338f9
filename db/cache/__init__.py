"""Read-through cache between servicers and repositories (Redis fronted by a near cache
that Redis invalidates, or an in-process LRU).

Values are bytes (servicers store serialized protobufs); see :mod:`db.cache.cache` for
the semantics and :func:`create_cache` for construction.
"""

from db.cache.backend import CacheBackend
from db.cache.breaker import BreakerState, CircuitBreaker
from db.cache.cache import Cache, Loader
from db.cache.errors import CacheBackendError, CacheUnavailable
from db.cache.factory import create_cache
from db.cache.keys import UNKNOWN_GENERATION, CacheKey, generation_key
from db.cache.local_backend import LocalBackend
from db.cache.redis_backend import RedisBackend
from db.cache.stats import CacheStats

__all__ = [
    "UNKNOWN_GENERATION",
    "BreakerState",
    "Cache",
    "CacheBackend",
    "CacheBackendError",
    "CacheKey",
    "CacheStats",
    "CacheUnavailable",
    "CircuitBreaker",
    "Loader",
    "LocalBackend",
    "RedisBackend",
    "create_cache",
    "generation_key",
]
