"""The bounds on open watch streams: per process and per caller.

A watch is a long-lived RPC, and it also holds a slot of the authenticated RPC budget
(``FERRULE_MAX_CONCURRENT_RPCS``, server/interceptors/capacity.py). ``FERRULE_MAX_WATCHES``
(default half of that budget) keeps watches from taking every slot unary calls need;
``FERRULE_MAX_WATCHES_PER_CALLER`` keeps one token from taking every watch. Both refuse
at once with RESOURCE_EXHAUSTED and RetryInfo, never queue.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import ResourceExhaustedError
from server.read_routing import CallerKey, caller_key


class WatchSlots:
    """Watches open in this process, in total and per caller (the event loop is
    single-threaded, so plain counters are exact)."""

    def __init__(self, max_watches: int, max_per_caller: int) -> None:
        self.max_watches = max_watches
        self.max_per_caller = max_per_caller
        self.open = 0
        self._by_caller: Counter[CallerKey | None] = Counter()

    @contextmanager
    def slot(self) -> Iterator[None]:
        caller = caller_key()
        if self.open >= self.max_watches:
            raise ResourceExhaustedError(
                f"the server is at its limit of {self.max_watches} open watches; retry later"
            )
        if self._by_caller[caller] >= self.max_per_caller:
            raise ResourceExhaustedError(
                f"the caller has {self.max_per_caller} open watches, its limit; "
                "close one or retry later"
            )
        self.open += 1
        self._by_caller[caller] += 1
        try:
            yield
        finally:
            self.open -= 1
            self._by_caller[caller] -= 1
            if not self._by_caller[caller]:
                del self._by_caller[caller]
