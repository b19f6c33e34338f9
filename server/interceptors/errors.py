"""Maps every exception escaping a handler to a status with rich details (server/errors.py)."""

from __future__ import annotations

from types import TracebackType

import grpc

from server.errors import abort
from server.interceptors.scoped import Context, ScopedInterceptor


class _ErrorScope:
    """An async context manager by hand (cheaper per call than a generator-based one).
    Only ``Exception`` is mapped: an abort is already a status, and a cancelled call
    (CancelledError, GeneratorExit: BaseExceptions) has nobody left to tell."""

    __slots__ = ("_context",)

    def __init__(self, context: Context) -> None:
        self._context = context

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
            await abort(self._context, exc)  # the mapper decides what is safe to say


class ErrorMappingInterceptor(ScopedInterceptor):
    def scope(self, method: str, context: Context, request: object) -> _ErrorScope:
        return _ErrorScope(context)
