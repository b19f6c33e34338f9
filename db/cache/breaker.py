"""A consecutive-failure circuit breaker, so an outage does not cost a timeout per call."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Closed: every call goes through. After ``failure_threshold`` consecutive failures
    it opens and refuses calls for ``cooldown_s``; then it half-opens and lets exactly
    one probe call through: success closes it, failure opens it for another cool-down.
    A probe that never reports (its task vanished) is replaced after another cool-down.
    """

    def __init__(
        self,
        *,
        failure_threshold: int = 5,
        cooldown_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        if cooldown_s <= 0:
            raise ValueError("cooldown_s must be positive")
        self._threshold = failure_threshold
        self._cooldown = cooldown_s
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._since = 0.0  # when the state was entered (open) or the probe started

    @property
    def state(self) -> BreakerState:
        return self._state

    @property
    def is_closed(self) -> bool:
        return self._state is BreakerState.CLOSED

    def allow(self) -> bool:
        """Whether a call may go to the backend now (and, half-open, become the probe)."""
        if self._state is BreakerState.CLOSED:
            return True
        now = self._clock()
        if now - self._since < self._cooldown:
            return False
        self._state = BreakerState.HALF_OPEN
        self._since = now
        return True

    def record_success(self) -> None:
        self._failures = 0
        self._state = BreakerState.CLOSED

    def record_failure(self) -> None:
        self._failures += 1
        if self._state is BreakerState.HALF_OPEN or self._failures >= self._threshold:
            self._state = BreakerState.OPEN
            self._since = self._clock()
