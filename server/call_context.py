"""What one RPC knows about itself, available to every layer below the interceptors.

A ContextVar (not a parameter threaded through every call) because grpc.aio runs the
interceptors and the handler in the same task, and the values are per-RPC by nature.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Collection
from contextvars import ContextVar, Token
from dataclasses import dataclass, field

from server.auth import Principal

#: A call's invocation metadata: (key, value) pairs, values bytes for ``-bin`` keys.
Metadata = Collection[tuple[str, str | bytes]]


@dataclass(slots=True)
class CallContext:
    method: str
    principal: Principal | None = None
    #: Absolute time.monotonic() at which the caller gives up, if it set a deadline.
    deadline: float | None = None
    #: Organization id the RPC ended up scoped to (for logs, spans, the request log).
    organization_id: str | None = None
    #: Serialized size of the request message (unary requests; 0 for client streams).
    request_bytes: int = 0
    #: Hex trace id of the RPC's span when tracing is on (for logs and the request log).
    trace_id: str | None = None
    #: The caller's metadata, read from the servicer context once per call: grpc.aio
    #: builds a new tuple of new pairs each time it is asked, and the call's scopes
    #: (tracing, request log, authentication) each need it. Out of the repr: it holds the
    #: caller's bearer token.
    metadata: Metadata = field(default=(), repr=False)

    def remaining_ms(self, default_ms: int) -> int:
        """Milliseconds left before the deadline (at least 1), or the default without one."""
        if self.deadline is None:
            return default_ms
        return max(1, int((self.deadline - time.monotonic()) * 1000))


_current: ContextVar[CallContext | None] = ContextVar("ferrule_call", default=None)


def current_call() -> CallContext:
    call = _current.get()
    if call is None:
        raise RuntimeError("no RPC in progress (interceptors not installed?)")
    return call


def metadata_value(metadata: Metadata, key: str) -> str | None:
    """The first text value of ``key`` (lower case, as gRPC delivers keys), or None."""
    for name, value in metadata:
        if name == key:
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return None


def maybe_current_call() -> CallContext | None:
    return _current.get()


def set_current_call(call: CallContext) -> Token[CallContext | None]:
    return _current.set(call)


def reset_current_call(token: Token[CallContext | None]) -> None:
    """Undo :func:`set_current_call`; nothing to undo when called from another context
    (a handler coroutine closed by the garbage collector after its task was dropped runs
    its exits wherever the collection happens, and that context never held the call)."""
    with contextlib.suppress(ValueError):
        _current.reset(token)
