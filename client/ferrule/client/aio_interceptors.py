"""The asyncio client interceptor: deadline, credentials, tracing, typed errors.

Errors become :class:`~ferrule.client.errors.FerruleError` subclasses:

* unary-unary calls: ``await stub.Method(request)`` raises them (the interceptor waits
  for the outcome; cancelling the call still cancels the RPC);
* streaming responses (unary-stream and stream-stream): ``async for`` and ``read()``
  raise them; ``write()``, ``done_writing()``, ``cancel()`` and metadata work as usual;
* stream-unary calls are returned untouched, because waiting for their outcome inside
  the interceptor would deadlock callers that ``write()`` the requests: their errors stay
  ``grpc.aio.AioRpcError`` (pass them to :func:`~ferrule.client.errors.from_rpc_error`).

``code()``/``details()`` of a unary-unary call that failed raise the typed error too:
use the exception instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from typing import TypeVar

import grpc
from grpc import aio

from ferrule.client.errors import from_rpc_error
from ferrule.client.outgoing import OutgoingPolicy
from ferrule.client.tracing import RpcSpan

__all__ = [
    "StreamStreamInterceptor",
    "StreamUnaryInterceptor",
    "UnaryStreamInterceptor",
    "UnaryUnaryInterceptor",
    "client_interceptors",
]

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")

# Tasks that read a finished streaming call's status for its span; held so they are not
# garbage-collected while pending.
_span_tasks: set[asyncio.Task[None]] = set()


async def _finish_with_code(call: aio.Call, span: RpcSpan) -> None:
    span.finish(await call.code())


def _finish_when_done(call: aio.Call, span: RpcSpan) -> None:
    loop = asyncio.get_running_loop()  # done callbacks run on this loop

    def done(_: object) -> None:
        task = loop.create_task(_finish_with_code(call, span))
        _span_tasks.add(task)
        task.add_done_callback(_span_tasks.discard)

    call.add_done_callback(done)


async def _translated(call: AsyncIterable[_Resp], span: RpcSpan) -> AsyncIterator[_Resp]:
    try:
        async for response in call:
            yield response
    except aio.AioRpcError as err:
        typed = from_rpc_error(err)
        span.finish(typed.code, typed)
        raise typed from err


class _Interceptor:
    """Shared by the four interceptors below (grpc.aio files an interceptor object under
    the first call type it implements only, so each call type needs its own object)."""

    def __init__(self, policy: OutgoingPolicy) -> None:
        self._policy = policy

    def _prepare(self, details: aio.ClientCallDetails) -> tuple[aio.ClientCallDetails, RpcSpan]:
        span = self._policy.start_span(details.method)
        metadata = aio.Metadata.from_tuple(self._policy.metadata(details.metadata, span))
        new = aio.ClientCallDetails(
            method=details.method,
            timeout=self._policy.timeout(details.timeout),
            metadata=metadata,
            credentials=details.credentials,
            wait_for_ready=details.wait_for_ready,
        )
        return new, span


class UnaryUnaryInterceptor(_Interceptor, aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, _Req], Awaitable[aio.UnaryUnaryCall[_Req, _Resp]]
        ],
        client_call_details: aio.ClientCallDetails,
        request: _Req,
    ) -> aio.UnaryUnaryCall[_Req, _Resp]:
        details, span = self._prepare(client_call_details)
        try:
            call = await continuation(details, request)
            await call
        except aio.AioRpcError as err:
            typed = from_rpc_error(err)
            span.finish(typed.code, typed)
            raise typed from err
        except asyncio.CancelledError:
            span.finish(grpc.StatusCode.CANCELLED)
            raise
        span.finish(grpc.StatusCode.OK)
        return call  # finished: awaiting it again returns the cached response


class UnaryStreamInterceptor(_Interceptor, aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, _Req], Awaitable[aio.UnaryStreamCall[_Req, _Resp]]
        ],
        client_call_details: aio.ClientCallDetails,
        request: _Req,
    ) -> AsyncIterator[_Resp]:
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request)
        _finish_when_done(call, span)
        return _translated(call, span)


class StreamUnaryInterceptor(_Interceptor, aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]],
            Awaitable[aio.StreamUnaryCall[_Req, _Resp]],
        ],
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> aio.StreamUnaryCall[_Req, _Resp]:
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request_iterator)
        _finish_when_done(call, span)
        return call


class StreamStreamInterceptor(_Interceptor, aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: Callable[
            [aio.ClientCallDetails, AsyncIterable[_Req] | Iterable[_Req]],
            Awaitable[aio.StreamStreamCall[_Req, _Resp]],
        ],
        client_call_details: aio.ClientCallDetails,
        request_iterator: AsyncIterable[_Req] | Iterable[_Req],
    ) -> AsyncIterator[_Resp]:
        details, span = self._prepare(client_call_details)
        call = await continuation(details, request_iterator)
        _finish_when_done(call, span)
        return _translated(call, span)


def client_interceptors(policy: OutgoingPolicy) -> list[aio.ClientInterceptor]:
    """One interceptor per call type, all applying ``policy``."""
    return [
        UnaryUnaryInterceptor(policy),
        UnaryStreamInterceptor(policy),
        StreamUnaryInterceptor(policy),
        StreamStreamInterceptor(policy),
    ]
