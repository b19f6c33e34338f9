"""The operations :class:`Cache` needs from a store; Redis and the in-process LRU give them.

Every method raises :class:`~db.cache.errors.CacheBackendError` on failure and nothing
else (apart from cancellation); the front turns failures into loader calls.

A *lease* is a short-lived token on an entry taken before loading it: a fill only lands
if the lease is still the one taken, and an invalidation deletes the lease with the
entry. So a load that read the database before a write cannot store its stale value
after that write's invalidation (the classic read-through race), and across processes
the lease doubles as the lock that lets one process load a cold key while others wait.
"""

from __future__ import annotations

from typing import Protocol

from db.cache.near_cache import NearCache


class CacheBackend(Protocol):
    @property
    def name(self) -> str:
        """``redis`` or ``local``, for health reports."""
        ...

    @property
    def degraded(self) -> bool:
        """True while the backend is being skipped (circuit breaker not closed)."""
        ...

    @property
    def near(self) -> NearCache | None:
        """The in-process cache in front of a remote backend, if any."""
        ...

    async def get(self, key: str, ttl_ms: int | None = None) -> bytes | None:
        """The value, or None. ``ttl_ms``: the entry's TTL, bounding how long a near
        cache may keep what it read."""
        ...

    async def delete(self, *keys: str) -> None: ...

    async def claim(
        self, key: str, lease_key: str, token: str, ttl_ms: int
    ) -> tuple[bytes | None, bool]:
        """Atomically: the value if ``key`` has one, ``(value, False)``; else take the
        lease if nobody holds it, ``(None, True)``; else ``(None, False)``. One step, so
        a fill cannot slip between "no value yet" and "the lease is free"."""
        ...

    async def fill(self, key: str, lease_key: str, token: str, value: bytes, ttl_ms: int) -> bool:
        """Store ``value`` and drop the lease, atomically, only if ``token`` still holds it."""
        ...

    async def release_lease(self, lease_key: str, token: str) -> None:
        """Drop the lease if ``token`` still holds it (a failed or abandoned load)."""
        ...

    async def read_counter(self, key: str, initial: int) -> int:
        """The counter's value, creating it at ``initial`` if it does not exist."""
        ...

    async def bump_counter(self, key: str, initial: int) -> int:
        """Increment the counter (created at ``initial`` first if missing); the new value."""
        ...

    async def peek_counter(self, key: str) -> int | None:
        """The counter's value, or None if it does not exist (never creates it)."""
        ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def ttl_to_ms(ttl: float) -> int:
    """Seconds to whole milliseconds, at least 1 (PX 0 is an error in Redis)."""
    return max(1, int(ttl * 1000))
