"""Creates the per-RPC CallContext (method, deadline) that everything below reads."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from google.protobuf.message import Message

from server.call_context import CallContext, reset_current_call, set_current_call
from server.interceptors.scoped import Context, ScopedInterceptor


class CallContextInterceptor(ScopedInterceptor):
    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: object) -> AsyncIterator[None]:
        remaining = context.time_remaining()
        deadline = None if remaining is None else time.monotonic() + remaining
        size = request.ByteSize() if isinstance(request, Message) else 0
        token = set_current_call(CallContext(method=method, deadline=deadline, request_bytes=size))
        try:
            yield
        finally:
            reset_current_call(token)
