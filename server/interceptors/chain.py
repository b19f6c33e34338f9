"""The server's interceptors as one, each method's wrapped handler built once.

grpc.aio runs every interceptor's ``intercept_service`` on every call: each awaits its
continuation and wraps the handler anew (a new handler object and closure per
interceptor per call), although what each one builds depends only on the method. This
chain runs the same interceptors in the same order, the first time a method is called,
and serves later calls of that method the handler it built then, so the per-call work
left is the wrappers' behaviour itself: every scope (call context, tracing, request
log, error mapping, capacity, authentication, input boundary) still runs on every call.
Neighbouring interceptors whose scopes are plain calls (SyncScopedInterceptor) share one
wrapper coroutine: each call enters their scopes in order and exits them in reverse, as
when each wraps the next, without a coroutine and an async context manager per scope.

Contract for an interceptor in the chain: what its ``intercept_service`` returns depends
on the method name and the handler below it only, never on the call's metadata (every
per-call decision belongs in the behaviour it wraps). Unknown methods (no handler) are
not remembered, so the table holds at most the registered methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from server.interceptors.scoped import (
    Continuation,
    Handler,
    SyncScopedInterceptor,
    wrap_handler_scopes,
)


class InterceptorChain(grpc.aio.ServerInterceptor):
    def __init__(self, interceptors: Sequence[grpc.aio.ServerInterceptor]) -> None:
        self._interceptors = tuple(interceptors)
        self._handlers: dict[str, Handler] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = self._handlers.get(handler_call_details.method)
        if handler is not None:
            return handler
        built = await self._through(0, continuation, handler_call_details)
        if built is not None:
            self._handlers[handler_call_details.method] = built
        return built

    async def _through(
        self, index: int, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> Handler | None:
        """Interceptor ``index`` with the rest of the chain as its continuation, as
        grpc.aio composes them (the first one outermost)."""
        interceptors = self._interceptors
        if index == len(interceptors):
            return await continuation(details)
        if isinstance(interceptors[index], SyncScopedInterceptor):
            return await self._fused(index, continuation, details)

        async def rest(inner_details: grpc.HandlerCallDetails) -> Handler | None:
            return await self._through(index + 1, continuation, inner_details)

        handler: Handler | None = await interceptors[index].intercept_service(rest, details)
        return handler

    async def _fused(
        self, index: int, continuation: Continuation, details: grpc.HandlerCallDetails
    ) -> Handler | None:
        """The run of SyncScopedInterceptors from ``index`` around the rest of the chain,
        as one wrapper: what each one's ``intercept_service`` would do, in one coroutine."""
        run: list[SyncScopedInterceptor] = []
        end = index
        while end < len(self._interceptors):
            interceptor = self._interceptors[end]
            if not isinstance(interceptor, SyncScopedInterceptor):
                break
            run.append(interceptor)
            end += 1
        handler = await self._through(end, continuation, details)
        if handler is None:
            return None
        # Each one is asked about the handler the rest built (wrapping keeps its shape).
        factories = [
            factory
            for interceptor in run
            if (factory := interceptor.scope_factory(details.method, handler)) is not None
        ]
        return wrap_handler_scopes(handler, factories) if factories else handler
