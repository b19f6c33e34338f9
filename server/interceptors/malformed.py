"""Requests that are not valid protobuf get INVALID_ARGUMENT, not grpc.aio's UNKNOWN.

grpc.aio answers a message its deserializer cannot parse with UNKNOWN ("Exception
deserializing request!"), which tells a client nothing and looks like a server fault.
This interceptor wraps each handler's deserializer so that a bad message becomes a
marker, and the behaviour raises a ValidationError for it: after authentication (the
interceptor is innermost), and mapped with details like any other bad input.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from db.errors import FieldViolation, ValidationError
from server.interceptors.scoped import (
    Context,
    Continuation,
    Handler,
    rebuild,
    shape_of,
    yields_responses,
)


class _Malformed:
    """Stands in for a request message that could not be parsed."""


MALFORMED = _Malformed()


def _refusal() -> ValidationError:
    return ValidationError(
        [FieldViolation("request", "is not a valid protobuf encoding of the request message")]
    )


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, ValueError, TypeError):
            return MALFORMED

    return parse


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        if request is MALFORMED:
            raise _refusal()
        yield request


def _wrap(handler: Handler) -> Handler:
    deserialize = _tolerant(handler.request_deserializer)
    shape = shape_of(handler)
    inner: Any = getattr(handler, shape)
    if shape.startswith("stream_"):
        # Stream requests are checked as the behaviour reads them.
        if shape == "stream_stream" and yields_responses(inner):

            async def stream_generator(
                requests: AsyncIterator[Any], context: Context
            ) -> AsyncIterator[Any]:
                async for response in inner(_checked(requests), context):
                    yield response

            return rebuild(handler, stream_generator, deserialize)

        async def stream_coroutine(requests: AsyncIterator[Any], context: Context) -> Any:
            return await inner(_checked(requests), context)

        return rebuild(handler, stream_coroutine, deserialize)
    if shape == "unary_stream" and yields_responses(inner):

        async def unary_generator(request: Any, context: Context) -> AsyncIterator[Any]:
            if request is MALFORMED:
                raise _refusal()
            async for response in inner(request, context):
                yield response

        return rebuild(handler, unary_generator, deserialize)

    async def unary_coroutine(request: Any, context: Context) -> Any:
        if request is MALFORMED:
            raise _refusal()
        return await inner(request, context)

    return rebuild(handler, unary_coroutine, deserialize)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else _wrap(handler)
