"""Maps every exception escaping a handler to a status with rich details (server/errors.py)."""

from __future__ import annotations

from typing import ClassVar

import grpc

from server.errors import abort
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
)


class _ErrorScope(ScopeContextManager):
    """Nothing to do on entry or on success; an exception that reaches it is settled by
    sending its status (awaited, only on failure, so the scope joins the plain-call ones
    in one coroutine). Only ``Exception`` is mapped: an abort is already a status, and a
    cancelled call (CancelledError, GeneratorExit: BaseExceptions) has nobody left to
    tell."""

    __slots__ = ("_context",)

    settles: ClassVar[bool] = True

    def __init__(self, context: Context) -> None:
        self._context = context

    def enter(self) -> None:
        return None

    def exit(self, exc: BaseException | None) -> None:
        return None

    async def settle(self, exc: Exception) -> None:
        if not isinstance(exc, grpc.aio.AbortError):
            await abort(self._context, exc)  # the mapper decides what is safe to say


class ErrorMappingInterceptor(SyncScopedInterceptor):
    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory:
        return lambda context, request: _ErrorScope(context)
