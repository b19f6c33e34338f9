"""Authentication (who) and authorization (what the RPC needs) before every behaviour.

The access each RPC needs comes from the one table in server/authorization.py: anonymous
RPCs pass untouched, every other one needs a valid bearer token with the right scope,
and an RPC the table does not name is refused whatever the credentials (default deny).
"""

from __future__ import annotations

from types import MappingProxyType

from server.auth import Authenticator
from server.authorization import RPC_ACCESS, Access, access_of, check_scope
from server.call_context import Metadata, current_call, metadata_value
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
)


def bearer_of(metadata: Metadata) -> str | None:
    """The call's ``authorization`` value (the authenticator checks its form)."""
    return metadata_value(metadata, "authorization")


class _Checked(ScopeContextManager):
    """Authenticates and authorizes one call on entry; nothing to do on exit."""

    __slots__ = ("_access", "_context", "_interceptor", "_method")

    def __init__(
        self, interceptor: AuthInterceptor, method: str, access: Access, context: Context
    ) -> None:
        self._interceptor = interceptor
        self._method = method
        self._access = access
        self._context = context

    def enter(self) -> None:
        self._interceptor.check(self._method, self._access, self._context)

    def exit(self, exc: BaseException | None) -> None:
        return None


class _Denied(ScopeContextManager):
    """Refuses a method the table does not name, whatever the credentials."""

    __slots__ = ("_method", "_table")

    def __init__(self, method: str, table: MappingProxyType[str, Access]) -> None:
        self._method = method
        self._table = table

    def enter(self) -> None:
        access_of(self._method, self._table)  # raises, with the reason

    def exit(self, exc: BaseException | None) -> None:
        return None


class AuthInterceptor(SyncScopedInterceptor):
    """Nothing to do once the handler is running: the scope only checks on entry."""

    def __init__(
        self,
        authenticator: Authenticator,
        table: MappingProxyType[str, Access] = RPC_ACCESS,
    ) -> None:
        self._authenticator = authenticator
        self._table = table

    def check(self, method: str, access: Access, context: Context) -> None:
        call = current_call()
        principal = self._authenticator.authenticate(bearer_of(call.metadata))
        check_scope(principal, access, method)
        call.principal = principal

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory | None:
        access = self._table.get(method)
        if access is Access.ANONYMOUS:
            return None
        if access is None:
            table = self._table
            return lambda context, request: _Denied(method, table)
        return lambda context, request: _Checked(self, method, access, context)
