"""The server's interceptors as one, each method's wrapped handler built once.

grpc.aio runs every interceptor's ``intercept_service`` on every call: each awaits its
continuation and wraps the handler anew (a new handler object and closure per
interceptor per call), although what each one builds depends only on the method. This
chain runs the same interceptors in the same order, the first time a method is called,
and serves later calls of that method the handler it built then, so the per-call work
left is the wrappers' behaviour itself: every scope (call context, tracing, request
log, error mapping, capacity, authentication, input boundary) still runs on every call.

Contract for an interceptor in the chain: what its ``intercept_service`` returns depends
on the method name and the handler below it only, never on the call's metadata (every
per-call decision belongs in the behaviour it wraps). Unknown methods (no handler) are
not remembered, so the table holds at most the registered methods.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from server.interceptors.scoped import Continuation, Handler


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
        if index == len(self._interceptors):
            return await continuation(details)

        async def rest(inner_details: grpc.HandlerCallDetails) -> Handler | None:
            return await self._through(index + 1, continuation, inner_details)

        handler: Handler | None = await self._interceptors[index].intercept_service(rest, details)
        return handler
