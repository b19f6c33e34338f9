"""In-process backend for the embedded default (no REDIS_URL): a bounded LRU with TTLs."""

from __future__ import annotations

import time
from collections.abc import Callable

from db.cache.errors import CacheBackendError
from db.cache.lru import ExpiringLRU


class LocalBackend:
    """LRU of at most ``max_entries`` values, each with its own expiry.

    Leases and generation counters live outside the LRU: evicting a counter would reset
    a generation and make old statistics reachable again, and counters are one small
    int per tenant scope. Everything runs on the event loop thread, so there is no lock
    and no call ever fails or blocks.
    """

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._max = max_entries
        self._clock = clock
        self._entries = ExpiringLRU(max_entries, clock=clock)
        self._leases: dict[str, tuple[str, float]] = {}
        self._counters: dict[str, int] = {}
        self._closed = False

    @property
    def name(self) -> str:
        return "local"

    @property
    def degraded(self) -> bool:
        return False

    @property
    def near(self) -> None:
        return None  # this backend is in process already

    def __len__(self) -> int:
        return len(self._entries)

    def _check_open(self) -> None:
        if self._closed:
            raise CacheBackendError("local cache is closed")

    async def get(self, key: str, ttl_ms: int | None = None) -> bytes | None:
        self._check_open()
        return self._entries.get(key)

    async def delete(self, *keys: str) -> None:
        self._check_open()
        for key in keys:
            self._entries.pop(key)
            self._leases.pop(key, None)
            self._counters.pop(key, None)

    def _live_lease(self, lease_key: str) -> str | None:
        lease = self._leases.get(lease_key)
        if lease is None:
            return None
        token, expires = lease
        if expires <= self._clock():
            del self._leases[lease_key]
            return None
        return token

    async def claim(
        self, key: str, lease_key: str, token: str, ttl_ms: int
    ) -> tuple[bytes | None, bool]:
        value = await self.get(key)
        if value is not None:
            return value, False
        if self._live_lease(lease_key) is not None:
            return None, False
        if len(self._leases) >= self._max:
            self._sweep_leases()
        self._leases[lease_key] = (token, self._clock() + ttl_ms / 1000)
        return None, True

    def _sweep_leases(self) -> None:
        """Drop expired leases (abandoned by loads that never filled or released)."""
        now = self._clock()
        for lease_key in [k for k, (_, exp) in self._leases.items() if exp <= now]:
            del self._leases[lease_key]

    async def fill(self, key: str, lease_key: str, token: str, value: bytes, ttl_ms: int) -> bool:
        self._check_open()
        if self._live_lease(lease_key) != token:
            return False
        del self._leases[lease_key]
        self._entries.put(key, value, ttl_ms / 1000)
        return True

    async def release_lease(self, lease_key: str, token: str) -> None:
        self._check_open()
        if self._live_lease(lease_key) == token:
            del self._leases[lease_key]

    async def read_counter(self, key: str, initial: int) -> int:
        self._check_open()
        return self._counters.setdefault(key, initial)

    async def bump_counter(self, key: str, initial: int) -> int:
        self._check_open()
        value = self._counters.get(key, initial) + 1
        self._counters[key] = value
        return value

    async def peek_counter(self, key: str) -> int | None:
        self._check_open()
        return self._counters.get(key)

    async def ping(self) -> None:
        self._check_open()

    async def close(self) -> None:
        self._closed = True
        self._entries.clear()
        self._leases.clear()
        self._counters.clear()
