"""Cache counters and the snapshot handed to health reports and metrics."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class CacheStats:
    """A point-in-time copy of the counters of one :class:`Cache` (one process).

    ``hits``/``misses`` count reads the backend answered; ``bypassed`` counts reads that
    went straight to the loader because the backend was unavailable (breaker open,
    pending invalidations, unknown generation); ``errors`` counts failed backend calls;
    ``loads`` counts loader calls; ``degraded`` is true while the breaker is not closed
    or invalidations are waiting to be replayed. ``near_*``: the near cache in front of
    Redis (hits it served from memory, values held, whether its listener is subscribed).
    """

    backend: str
    hits: int
    misses: int
    bypassed: int
    errors: int
    loads: int
    degraded: bool
    pending_invalidations: int
    lost_invalidations: int
    near_hits: int = 0
    near_entries: int = 0
    near_tracking: bool = False

    @property
    def hit_rate(self) -> float:
        looked_up = self.hits + self.misses + self.bypassed
        return self.hits / looked_up if looked_up else 0.0


@dataclass(slots=True)
class Counters:
    """Mutable counters; only the event loop thread touches them, so no lock."""

    hits: int = 0
    misses: int = 0
    bypassed: int = 0
    errors: int = 0
    loads: int = 0
    lost_invalidations: int = 0
