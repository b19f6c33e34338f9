"""Concurrency limits: tenants' RPCs and anonymous streams never share one budget.

Two counters of calls in flight, each refused at once with RESOURCE_EXHAUSTED (and
RetryInfo) when full, never queued:
- authenticated RPCs (everything that needs a token): ``FERRULE_MAX_CONCURRENT_RPCS``;
- anonymous streams (health Watch, reflection), which a caller without credentials can
  hold open for as long as it likes: ``FERRULE_MAX_ANONYMOUS_STREAMS``, small.
An anonymous unary call (health Check) is answered from memory and cannot be held open,
so it counts against neither: held Watch streams can never make a load balancer's or
kubelet's Check fail, and no anonymous call can take a tenant's slot. A Watch or
reflection stream that carries a valid bearer token counts as the tenant's: a client
whose channel sends its credentials (gRPC client-side health checking does) cannot be
locked out of Watch by anonymous callers filling their budget.

grpc.aio's own ``maximum_concurrent_rpcs`` is not used: it counts every RPC in one
budget, which is exactly what lets anonymous streams lock tenants out.
"""

from __future__ import annotations

from types import MappingProxyType

from server.auth import AuthenticationError, Authenticator
from server.authorization import RPC_ACCESS, Access
from server.call_context import current_call
from server.errors import ResourceExhaustedError
from server.interceptors.auth import bearer_of
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
    shape_of,
)


class _Budget:
    """Calls in flight against one limit; the event loop is single-threaded, so a plain
    counter is exact."""

    def __init__(self, limit: int, what: str) -> None:
        self.limit = limit
        self.in_flight = 0
        self._what = what

    def slot(self, context: Context, request: object) -> _Slot:
        return _Slot(self)

    def refusal(self) -> ResourceExhaustedError:
        return ResourceExhaustedError(
            f"the server is at its limit of {self.limit} concurrent {self._what}; retry later"
        )


class _Slot(ScopeContextManager):
    """Holds one unit of a budget for the duration of a call."""

    __slots__ = ("_budget",)

    def __init__(self, budget: _Budget) -> None:
        self._budget = budget

    def enter(self) -> None:
        budget = self._budget
        if budget.in_flight >= budget.limit:
            raise budget.refusal()
        budget.in_flight += 1

    def exit(self, exc: BaseException | None) -> None:
        self._budget.in_flight -= 1


class CapacityInterceptor(SyncScopedInterceptor):
    """Place it inside error mapping (so a refusal carries details) and outside
    authentication (so a refusal costs no token check)."""

    def __init__(
        self,
        *,
        max_rpcs: int,
        max_anonymous_streams: int,
        authenticator: Authenticator,
        table: MappingProxyType[str, Access] = RPC_ACCESS,
    ) -> None:
        self.authenticated = _Budget(max_rpcs, "RPCs")
        self.anonymous_streams = _Budget(max_anonymous_streams, "anonymous streams")
        self._authenticator = authenticator
        self._table = table

    def _public_stream_slot(self, context: Context, request: object) -> _Slot:
        bearer = bearer_of(current_call().metadata)
        if bearer is not None:
            try:
                self._authenticator.authenticate(bearer)
            except AuthenticationError:
                pass  # a bad token earns nothing: the call stays anonymous
            else:
                return _Slot(self.authenticated)
        return _Slot(self.anonymous_streams)

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory | None:
        if self._table.get(method) is Access.ANONYMOUS:
            if shape_of(handler) == "unary_unary":
                return None
            return self._public_stream_slot
        return self.authenticated.slot
