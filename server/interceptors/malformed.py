"""Where every request message enters: refused with INVALID_ARGUMENT unless it is valid
protobuf and passes the input boundary (server/input_boundary.py).

grpc.aio answers a message its deserializer cannot parse with UNKNOWN ("Exception
deserializing request!"), which tells a client nothing and looks like a server fault.
This interceptor wraps each handler's deserializer so that a bad message becomes a
marker, and the behaviour raises a ValidationError for it, or for a message that breaks
the input boundary: after authentication (the interceptor is innermost), and mapped with
details like any other bad input. Every message of a client stream is checked as it is
read.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from db.errors import FieldViolation, ValidationError
from server import input_boundary
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


def _admit(request: Any) -> None:
    if request is MALFORMED:
        raise _refusal()
    # Looked up on the module at every call: tests switch the boundary off to prove the
    # database backstop behind it.
    input_boundary.check(request)


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _admit(request)
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
            _admit(request)
            async for response in inner(request, context):
                yield response

        return rebuild(handler, unary_generator, deserialize)

    async def unary_coroutine(request: Any, context: Context) -> Any:
        _admit(request)
        return await inner(request, context)

    return rebuild(handler, unary_coroutine, deserialize)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else _wrap(handler)
