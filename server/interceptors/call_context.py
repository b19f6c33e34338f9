"""Creates the per-RPC CallContext (method, deadline) that everything below reads."""

from __future__ import annotations

import time
from contextvars import Token

from google.protobuf.message import Message

from server.call_context import CallContext, reset_current_call, set_current_call
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
)


class _CallScope(ScopeContextManager):
    """The CallContext for one call."""

    __slots__ = ("_call", "_token")

    def __init__(self, call: CallContext) -> None:
        self._call = call
        self._token: Token[CallContext | None] | None = None

    def enter(self) -> None:
        self._token = set_current_call(self._call)

    def exit(self, exc: BaseException | None) -> None:
        if self._token is not None:
            reset_current_call(self._token)


class CallContextInterceptor(SyncScopedInterceptor):
    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory:
        def scope(context: Context, request: object) -> _CallScope:
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            size = request.ByteSize() if isinstance(request, Message) else 0
            call = CallContext(
                method=method,
                deadline=deadline,
                request_bytes=size,
                metadata=context.invocation_metadata() or (),
            )
            return _CallScope(call)

        return scope
