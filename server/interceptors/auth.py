"""Authentication (who) and authorization (which scope) for every non-public RPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from server.auth import Authenticator
from server.authorization import check_scope, is_public
from server.call_context import current_call
from server.interceptors.scoped import Context, ScopedInterceptor


class AuthInterceptor(ScopedInterceptor):
    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    def applies(self, method: str) -> bool:
        return not is_public(method)

    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: object) -> AsyncIterator[None]:
        authorization = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode()
                break
        principal = self._authenticator.authenticate(authorization)
        check_scope(principal, method)
        current_call().principal = principal
        yield
