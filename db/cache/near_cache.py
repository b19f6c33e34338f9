"""The in-process near cache in front of Redis, kept fresh by Redis's invalidations.

Entries are only trusted while the invalidation listener is subscribed (``active``):
Redis tells every subscribed process about every write to the tracked keys, so an entry
that received no invalidation since it was read is still what Redis holds. When the
listener is lost, the whole cache is flushed and bypassed until it is back, since
invalidations sent in between are lost.

A read that goes to Redis takes a :class:`Ticket` *before* its command is sent, and its
value is only stored if no invalidation of that key (and no flush) arrived meanwhile:
otherwise a value read just before a write, whose reply is processed after the write's
invalidation, would be stored and outlive it. Invalidations arrive on another
connection, so their order against replies is not otherwise known.

Every entry also carries an expiry (the TTL backstop, in case an invalidation is lost
in a way nobody notices) and the cache is a bounded LRU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from db.cache.lru import ExpiringLRU


class Ticket:
    """A read in flight for one key; ``valid`` drops when the key is invalidated."""

    __slots__ = ("epoch", "key", "readers", "valid")

    def __init__(self, key: str, epoch: int) -> None:
        self.key = key
        self.epoch = epoch
        self.valid = True
        self.readers = 0


class NearCache:
    """LRU of at most ``max_entries`` values, each kept at most ``max_ttl_s`` seconds."""

    def __init__(
        self,
        max_entries: int,
        max_ttl_s: float,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_ttl_s <= 0:
            raise ValueError("max_ttl_s must be positive")
        self._max_ttl = max_ttl_s
        self._entries = ExpiringLRU(max_entries, clock=clock)
        self._tickets: dict[str, Ticket] = {}
        self._epoch = 0
        #: True while invalidations are known to arrive (the listener is subscribed).
        self.active = False
        self.hits = 0
        self.invalidations = 0
        self.flushes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def pending_tickets(self) -> int:
        return len(self._tickets)

    def get(self, key: str) -> bytes | None:
        if not self.active:
            return None
        value = self._entries.get(key)
        if value is not None:
            self.hits += 1
        return value

    def begin(self, key: str) -> Ticket | None:
        """Before a read of ``key`` is sent to Redis; None while inactive (do not store).

        Concurrent reads of one key share a ticket: an invalidation ends it for all."""
        if not self.active:
            return None
        ticket = self._tickets.get(key)
        if ticket is None:
            ticket = self._tickets[key] = Ticket(key, self._epoch)
        ticket.readers += 1
        return ticket

    def end(self, ticket: Ticket | None) -> None:
        """After the read (stored or not, failed or cancelled): always call it once."""
        if ticket is None:
            return
        ticket.readers -= 1
        if ticket.readers <= 0 and self._tickets.get(ticket.key) is ticket:
            del self._tickets[ticket.key]

    def store(self, ticket: Ticket | None, value: bytes, ttl_s: float | None = None) -> bool:
        """Keep ``value`` if nothing invalidated the ticket's key since it was taken."""
        if ticket is None or not ticket.valid or ticket.epoch != self._epoch or not self.active:
            return False
        ttl = self._max_ttl if ttl_s is None else min(ttl_s, self._max_ttl)
        self._entries.put(ticket.key, value, ttl)
        return True

    def invalidate(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.invalidations += 1
            self._entries.pop(key)
            ticket = self._tickets.pop(key, None)
            if ticket is not None:
                ticket.valid = False

    def flush(self) -> None:
        """Forget everything, including reads in flight (their tickets' epoch is over)."""
        self.flushes += 1
        self._epoch += 1
        self._entries.clear()
        for ticket in self._tickets.values():
            ticket.valid = False
        self._tickets.clear()
