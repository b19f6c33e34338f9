"""Authentication (who) and authorization (what the RPC needs) before every behaviour.

The access each RPC needs comes from the one table in server/authorization.py: anonymous
RPCs pass untouched, every other one needs a valid bearer token with the right scope,
and an RPC the table does not name is refused whatever the credentials (default deny).
"""

from __future__ import annotations

from types import MappingProxyType

import grpc

from server.auth import Authenticator
from server.authorization import RPC_ACCESS, Access, access_of, check_scope
from server.call_context import current_call
from server.interceptors.scoped import Context, Continuation, Handler, wrap_handler_before


def bearer_of(context: Context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return value if isinstance(value, str) else value.decode()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Nothing to do once the handler is running, so a plain call before it (no async
    context manager around it)."""

    def __init__(
        self,
        authenticator: Authenticator,
        table: MappingProxyType[str, Access] = RPC_ACCESS,
    ) -> None:
        self._authenticator = authenticator
        self._table = table

    def check(self, method: str, access: Access, context: Context) -> None:
        principal = self._authenticator.authenticate(bearer_of(context))
        check_scope(principal, access, method)
        current_call().principal = principal

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None  # grpc answers UNIMPLEMENTED
        method = handler_call_details.method
        access = self._table.get(method)
        if access is Access.ANONYMOUS:
            return handler
        if access is None:

            def deny(context: Context, request: object) -> None:
                access_of(method, self._table)  # raises, with the reason

            return wrap_handler_before(handler, deny)
        check = self.check
        return wrap_handler_before(handler, lambda context, request: check(method, access, context))
