"""A server interceptor expressed as a scope around the handler.

grpc.aio interceptors only see the method name before the handler runs; to act on the
request's context, its outcome and its exceptions we wrap the handler's behaviour, for
all four RPC shapes and both ways of streaming a response (an async generator, or a
coroutine writing with ``context.write``), so that a response is covered for its whole
length.

Two kinds of scope: an async context manager (:class:`ScopedInterceptor`), for work that
awaits, and a :class:`Scope` of plain calls (:class:`SyncScopedInterceptor`), for work
that does not (most of the server's). The second kind costs less per call, and several of
them run in one coroutine (:func:`wrap_handler_scopes`, which the interceptor chain uses
for neighbouring ones) instead of one wrapper coroutine and two method coroutines each.
A Scope may also *settle* an exception that reaches it, awaiting (error mapping sends the
status): only calls that fail await anything, so it joins the others' coroutine.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, ClassVar, Protocol, TypeAlias, cast

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
ScopeFactory = Callable[[Context, Any], AbstractAsyncContextManager[None]]


class Scope(Protocol):
    """One call's scope of plain calls: ``enter`` before the behaviour runs, ``exit`` once
    it has ended, with the exception it ended with (None if it returned). Like an async
    context manager's exit, ``exit`` never suppresses the exception; it may raise another
    one, which the scopes outside it then see instead. ``exit`` runs only if ``enter``
    returned."""

    def enter(self) -> None: ...

    def exit(self, exc: BaseException | None) -> None: ...


#: Builds the scope of one call from its context and its request (None for a stream).
SyncScopeFactory = Callable[[Context, Any], Scope]


class Settling(Scope, Protocol):
    """A Scope whose ``settles`` is True: an ``Exception`` that reaches it is first passed
    to ``settle``, awaited, which may raise another exception in its place; ``exit`` then
    sees what settling left."""

    settles: bool

    async def settle(self, exc: Exception) -> None: ...


class ScopeContextManager:
    """Base of a :class:`Scope` that also serves as an async context manager (for
    :func:`wrap_handler`): subclasses implement ``enter`` and ``exit``, and those that
    settle exceptions set ``settles`` and implement ``settle`` (see :class:`Settling`)."""

    __slots__ = ()

    #: Whether an exception reaching this scope is settled (awaited) before its exit.
    settles: ClassVar[bool] = False

    def enter(self) -> None:
        raise NotImplementedError

    def exit(self, exc: BaseException | None) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> None:
        self.enter()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self.settles and isinstance(exc, Exception):
            left = await _settled(cast(Settling, self), exc)
            if left is not exc:
                raise left
            return
        self.exit(exc)


# The stubs make RpcMethodHandler generic; at runtime it is not subscriptable.
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"


_CONSTRUCTORS = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


def shape_of(handler: Handler) -> str:
    """Which of the four RPC shapes `handler` serves ("unary_stream", ...)."""
    for shape in _CONSTRUCTORS:
        if getattr(handler, shape) is not None:
            return shape
    raise ValueError("handler serves no RPC shape")


def rebuild(
    handler: Handler,
    behaviour: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None = None,
    response_serializer: Callable[[Any], bytes] | None = None,
) -> Handler:
    """A handler of the same shape and serializers as `handler` (unless given), with a new
    behaviour."""
    constructor: Any = _CONSTRUCTORS[shape_of(handler)]
    result: Handler = constructor(
        behaviour,
        request_deserializer=request_deserializer or handler.request_deserializer,
        response_serializer=response_serializer or handler.response_serializer,
    )
    return result


def exit_status(
    context: Context, exc: BaseException | None
) -> tuple[grpc.StatusCode, BaseException | None]:
    """The status a scope's exit reports for a call that ended with ``exc``, and the
    unexpected exception among them (None for an abort, a cancellation or no error): one
    mapping for every scope, so the span and the request log never disagree."""
    error: BaseException | None = None
    if exc is None:
        code = grpc.StatusCode.OK
    elif isinstance(exc, grpc.aio.AbortError):
        code = grpc.StatusCode.UNKNOWN
    elif isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        code = grpc.StatusCode.CANCELLED
    else:
        code, error = grpc.StatusCode.UNKNOWN, exc
    return final_code(context, code), error


def final_code(context: Context, otherwise: grpc.StatusCode) -> grpc.StatusCode:
    """The status the call ended with, as grpc.aio recorded it (an abort, or a code the
    behaviour set), else ``otherwise``: what the scope saw leave the behaviour.

    A released call has no code to read. A try/except, not ``contextlib.suppress``: this
    runs at the end of every call, and the context manager costs more than the read."""
    try:
        return context.code() or otherwise
    except Exception:
        return otherwise


def yields_responses(behaviour: Callable[..., Any]) -> bool:
    """How a streaming-response behaviour sends: True for an async generator (yields
    each response), False for a coroutine that writes with ``context.write`` (grpc.aio's
    reader/writer API, which the standard health servicer's Watch uses).

    grpc.aio picks the calling convention with these same ``inspect`` checks, so a
    wrapper must be of the same kind as what it wraps: iterating a coroutine fails, and
    an async generator around a writer never sends what the writer writes.
    """
    if inspect.isasyncgenfunction(behaviour):
        return True
    if inspect.iscoroutinefunction(behaviour):
        return False
    raise TypeError(f"{behaviour!r} is not an asyncio handler (coroutine or async generator)")


def _check_unary_response(behaviour: Callable[..., Any]) -> None:
    if not inspect.iscoroutinefunction(behaviour):
        raise TypeError(f"{behaviour!r} is not an asyncio handler (coroutine function)")


def _writing(generator: Callable[..., AsyncGenerator[Any]]) -> Callable[..., Awaitable[None]]:
    """The async generator behaviour `generator` as a coroutine that writes what it
    yields with ``context.write``, and closes it in the call's own task.

    grpc.aio abandons a response generator whose call is cancelled while a response waits
    to be sent (flow control), and the event loop then closes it in a task and context of
    its own: scopes around it would exit there, without the call's context variables. A
    writer coroutine is cancelled where it waits, in its task, and closes the generator.
    """

    async def writer(request: Any, context: Context) -> None:
        async with contextlib.aclosing(generator(request, context)) as responses:
            async for response in responses:
                await context.write(response)

    return writer


def wrap_handler(handler: Handler, scope: ScopeFactory) -> Handler:
    """Return a copy of `handler` whose behaviour runs inside `scope(context, request)`.

    `request` is the request message for unary-request RPCs and None for streaming ones.
    Every handler kind is served: unary or streaming requests, and a response that is
    returned, yielded by an async generator (written by the wrapper, see `_writing`), or
    written by a coroutine.
    """
    shape = shape_of(handler)
    inner: Any = getattr(handler, shape)
    request_streams = shape.startswith("stream_")
    if shape.endswith("_stream") and yields_responses(inner):
        inner = _writing(inner)
    elif not shape.endswith("_stream"):
        _check_unary_response(inner)

    async def coroutine(request: Any, context: Context) -> Any:
        async with scope(context, None if request_streams else request):
            return await inner(request, context)

    return rebuild(handler, coroutine)


def wrap_handler_scopes(handler: Handler, scopes: Sequence[SyncScopeFactory]) -> Handler:
    """Like :func:`wrap_handler` for several :class:`Scope` factories at once, the first
    outermost, in one coroutine: each call enters its scopes in order and exits the ones
    it entered in reverse order, exactly as if each wrapped the next."""
    shape = shape_of(handler)
    inner: Any = getattr(handler, shape)
    request_streams = shape.startswith("stream_")
    if shape.endswith("_stream") and yields_responses(inner):
        inner = _writing(inner)
    elif not shape.endswith("_stream"):
        _check_unary_response(inner)
    factories = tuple(scopes)

    async def coroutine(request: Any, context: Context) -> Any:
        message = None if request_streams else request
        entered: list[Scope] = []
        error: BaseException | None = None
        response: Any = None
        try:
            for factory in factories:
                scope = factory(context, message)
                scope.enter()
                entered.append(scope)
            response = await inner(request, context)
        except BaseException as exc:
            error = exc
        index, error = _exited(entered, len(entered), error)
        while index >= 0:  # a scope settles the exception that reached it, then exits
            error = await _settled(cast(Settling, entered[index]), cast(Exception, error))
            index, error = _exited(entered, index, error)
        if error is not None:
            raise error
        return response

    return rebuild(handler, coroutine)


def _exited(
    entered: list[Scope], end: int, exc: BaseException | None
) -> tuple[int, BaseException | None]:
    """Exit ``entered[:end]`` innermost first, each seeing the exception that reaches it:
    ``exc`` or one a scope inside it raised instead. Stops at a scope that settles an
    ``Exception`` reaching it (its ``settle`` must be awaited first): returns its index,
    or -1 once every scope has exited, and the exception that reached that far."""
    index = end
    while index > 0:
        index -= 1
        scope = entered[index]
        if isinstance(exc, Exception) and getattr(scope, "settles", False):
            return index, exc
        try:
            scope.exit(exc)
        except BaseException as replaced:  # as from an __aexit__: it replaces exc
            exc = _replacing(replaced, exc)
    return -1, exc


async def _settled(scope: Settling, exc: Exception) -> BaseException:
    """``scope`` settles ``exc`` and exits; returns the exception that leaves it."""
    error: BaseException = exc
    try:
        await scope.settle(exc)
    except BaseException as replaced:
        error = _replacing(replaced, exc)
    try:
        scope.exit(error)
    except BaseException as replaced:
        error = _replacing(replaced, error)
    return error


def _replacing(replaced: BaseException, exc: BaseException | None) -> BaseException:
    if replaced.__context__ is None and replaced is not exc:
        replaced.__context__ = exc
    return replaced


class ScopedInterceptor(grpc.aio.ServerInterceptor):
    """Subclasses implement `scope`; `applies` lets them skip some methods cheaply."""

    def applies(self, method: str) -> bool:
        return True

    def scope(
        self, method: str, context: Context, request: Any
    ) -> AbstractAsyncContextManager[None]:
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not self.applies(method):
            return handler
        return wrap_handler(handler, lambda context, request: self.scope(method, context, request))


class SyncScopedInterceptor(grpc.aio.ServerInterceptor):
    """An interceptor whose work around a call is a :class:`Scope` of plain calls.
    Subclasses implement :meth:`scope_factory`. On its own it wraps each handler in one
    coroutine; in an :class:`~server.interceptors.chain.InterceptorChain`, neighbouring
    ones share one."""

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory | None:
        """The factory of ``method``'s per-call scopes (``handler`` is the one it wraps),
        or None to leave the method's handler as it is. Depends on the method and the
        handler only, never on one call."""
        raise NotImplementedError

    async def intercept_service(
        self,
        continuation: Continuation,
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        factory = self.scope_factory(handler_call_details.method, handler)
        return handler if factory is None else wrap_handler_scopes(handler, (factory,))
