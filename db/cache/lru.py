"""The bounded LRU with per-entry expiry that both in-process caches keep their values in
(the embedded backend, :mod:`db.cache.local_backend`, and the near cache in front of
Redis, :mod:`db.cache.near_cache`)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable


class ExpiringLRU:
    """At most ``max_entries`` values; the least recently used goes first, and a value
    past its expiry is never returned (it is dropped when next looked up)."""

    __slots__ = ("_clock", "_entries", "_max")

    def __init__(self, max_entries: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        value, expires = entry
        if expires <= self._clock():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return value

    def put(self, key: str, value: bytes, ttl_s: float) -> None:
        entries = self._entries
        entries[key] = (value, self._clock() + ttl_s)
        entries.move_to_end(key)
        while len(entries) > self._max:
            entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()
