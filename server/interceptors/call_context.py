"""Creates the per-RPC CallContext (method, deadline) that everything below reads."""

from __future__ import annotations

import time
from contextvars import Token
from types import TracebackType

from google.protobuf.message import Message

from server.call_context import CallContext, reset_current_call, set_current_call
from server.interceptors.scoped import Context, ScopedInterceptor


class _CallScope:
    """The CallContext for one call (an async context manager by hand: cheaper per call
    than a generator-based one, and this runs on every call)."""

    __slots__ = ("_call", "_token")

    def __init__(self, call: CallContext) -> None:
        self._call = call
        self._token: Token[CallContext | None] | None = None

    async def __aenter__(self) -> None:
        self._token = set_current_call(self._call)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._token is not None:
            reset_current_call(self._token)


class CallContextInterceptor(ScopedInterceptor):
    def scope(self, method: str, context: Context, request: object) -> _CallScope:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        size = request.ByteSize() if isinstance(request, Message) else 0
        return _CallScope(CallContext(method=method, deadline=deadline, request_bytes=size))
