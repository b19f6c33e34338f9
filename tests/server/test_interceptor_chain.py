"""The interceptor chain builds a method's handler once and still runs every scope on
every call, in grpc.aio's order; unknown methods stay UNIMPLEMENTED and are not kept."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from google.protobuf import wrappers_pb2

from server.interceptors.chain import InterceptorChain
from server.interceptors.scoped import Context, Continuation, Handler, ScopedInterceptor

Text = wrappers_pb2.StringValue


class Recording(ScopedInterceptor):
    def __init__(self, label: str, events: list[str]) -> None:
        self.label = label
        self.events = events
        self.built = 0

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        self.built += 1
        return await super().intercept_service(continuation, handler_call_details)

    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: object) -> AsyncIterator[None]:
        self.events.append(f"enter {self.label}")
        yield
        self.events.append(f"exit {self.label}")


async def echo(request: Text, context: Context) -> Text:
    return Text(value="echo:" + request.value)


@pytest.fixture
async def chained() -> AsyncIterator[tuple[grpc.aio.Channel, list[str], list[Recording]]]:
    events: list[str] = []
    recorders = [Recording("outer", events), Recording("inner", events)]
    server = grpc.aio.server(interceptors=[InterceptorChain(recorders)])
    handler = grpc.unary_unary_rpc_method_handler(
        echo, request_deserializer=Text.FromString, response_serializer=Text.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("chain.Echo", {"Echo": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, events, recorders
    finally:
        await server.stop(None)


def _call(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[Text, Text]:
    return channel.unary_unary(
        method, request_serializer=Text.SerializeToString, response_deserializer=Text.FromString
    )


async def test_each_call_runs_every_scope_in_order_through_a_handler_built_once(
    chained: tuple[grpc.aio.Channel, list[str], list[Recording]],
) -> None:
    channel, events, recorders = chained
    for value in ("a", "b", "c"):
        assert await _call(channel, "/chain.Echo/Echo")(Text(value=value)) == Text(
            value="echo:" + value
        )
    assert events == ["enter outer", "enter inner", "exit inner", "exit outer"] * 3
    assert [recorder.built for recorder in recorders] == [1, 1]


async def test_unknown_methods_are_unimplemented_and_never_remembered(
    chained: tuple[grpc.aio.Channel, list[str], list[Recording]],
) -> None:
    channel, events, recorders = chained
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _call(channel, "/chain.Echo/Missing")(Text(value="x"))
        assert raised.value.code() is grpc.StatusCode.UNIMPLEMENTED
    assert events == []
    # Each unknown call went through the chain again: nothing was kept for it.
    assert [recorder.built for recorder in recorders] == [2, 2]
