"""Backend failures. They never reach the caller of :class:`Cache`: it degrades instead."""

from __future__ import annotations


class CacheBackendError(Exception):
    """A backend call failed (connection refused or reset, timeout, server error)."""


class CacheUnavailable(CacheBackendError):
    """The circuit breaker is open: the backend was not called at all."""
