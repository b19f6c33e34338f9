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
from server.interceptors.scoped import Context, Continuation, Handler


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
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        inner_uu: Any = handler.unary_unary

        async def unary_unary(request: Any, context: Context) -> Any:
            if request is MALFORMED:
                raise _refusal()
            return await inner_uu(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, serialize)
    if handler.unary_stream is not None:
        inner_us: Any = handler.unary_stream

        async def unary_stream(request: Any, context: Context) -> AsyncIterator[Any]:
            if request is MALFORMED:
                raise _refusal()
            async for response in inner_us(request, context):
                yield response

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, serialize)
    if handler.stream_unary is not None:
        inner_su: Any = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: Context) -> Any:
            return await inner_su(_checked(requests), context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserialize, serialize)
    inner_ss: Any = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: Context) -> AsyncIterator[Any]:
        async for response in inner_ss(_checked(requests), context):
            yield response

    return grpc.stream_stream_rpc_method_handler(stream_stream, deserialize, serialize)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        return None if handler is None else _wrap(handler)
