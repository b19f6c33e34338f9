"""Authentication (who) and authorization (which scope) for every non-public RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc

from server.auth import Authenticator
from server.authorization import check_scope, is_public
from server.call_context import current_call
from server.interceptors.scoped import (
    Context,
    Continuation,
    Handler,
    ScopedInterceptor,
    wrap_handler_before,
)


class AuthInterceptor(ScopedInterceptor):
    """Nothing to do once the handler is running, so a plain call before it (no async
    context manager around it)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def applies(self, method: str) -> bool:
        return not is_public(method)

    def check(self, method: str, context: Context) -> None:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
                break
        principal = self._authenticator.authenticate(authorization)
        check_scope(principal, method)
        current_call().principal = principal

    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: object) -> AsyncIterator[None]:
        self.check(method, context)
        yield

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):
            return handler
        check = self.check
        return wrap_handler_before(handler, lambda context, request: check(method, context))
