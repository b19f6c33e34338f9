"""Who is running the current statement: set by the server per RPC, read by the db hooks.

The db layer cannot import the server's CallContext (layering), so the server copies the
few facts the statement observers need (RPC method, tenant) into this ContextVar. It is
mutable on purpose: the RPC's method is known when the call starts, its tenant only once
the request has been authorized, and both must reach statements issued in between.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar, Token
from dataclasses import dataclass

__all__ = [
    "StatementContext",
    "bind_statement_tenant",
    "current_statement_context",
    "reset_statement_context",
    "set_statement_context",
    "statement_context",
]


@dataclass(slots=True)
class StatementContext:
    #: Full gRPC method without the leading slash, e.g. ``ferrule.v1.UserService/GetUser``.
    rpc_method: str | None = None
    #: Organization id the work is scoped to, once known.
    tenant: str | None = None
    #: Hex trace id of the RPC, used when no OpenTelemetry span is active (tracing off).
    trace_id: str | None = None


_current: ContextVar[StatementContext | None] = ContextVar("ferrule_statement", default=None)


def current_statement_context() -> StatementContext | None:
    return _current.get()


def set_statement_context(context: StatementContext) -> Token[StatementContext | None]:
    return _current.set(context)


def reset_statement_context(token: Token[StatementContext | None]) -> bool:
    """Undo :func:`set_statement_context`; False, changing nothing, when called from
    another context. That happens when grpc.aio abandons a cancelled RPC's response
    generator at a yield: the event loop closes it in a task of its own, which runs in a
    copy of the RPC's context that nothing reads afterwards, so there is nothing to undo."""
    try:
        _current.reset(token)
    except ValueError:
        return False
    return True


def bind_statement_tenant(tenant: str | None) -> None:
    """Record the tenant on the current context (no-op outside one)."""
    context = _current.get()
    if context is not None:
        context.tenant = tenant


@contextmanager
def statement_context(
    rpc_method: str | None = None, tenant: str | None = None, trace_id: str | None = None
) -> Iterator[StatementContext]:
    """Scope a StatementContext, e.g. around a background job's statements."""
    context = StatementContext(rpc_method=rpc_method, tenant=tenant, trace_id=trace_id)
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
