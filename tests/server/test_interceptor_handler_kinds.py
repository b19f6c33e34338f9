"""Ferrule's interceptors serve every kind of grpc.aio handler, not only the kinds its
own servicers happen to use.

grpc.aio accepts six behaviours: a unary or streaming request, answered by a coroutine
that returns, an async generator that yields, or a coroutine that writes with
``context.write`` (the standard health servicer's Watch is one). Each is served here
through the server's own interceptors, with a scope that records that it saw the whole
call; the health Watch is then called on the real server.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.interceptors.malformed import MalformedRequestInterceptor
from server.interceptors.scoped import Context, ScopedInterceptor
from tests.polling import eventually
from tests.server.conftest import RunningServer

Behaviour = Callable[..., Any]


Text = wrappers_pb2.StringValue


def text(value: str) -> Text:
    return Text(value=value)


async def unary_returns(request: Text, context: Context) -> Text:
    return text("u:" + request.value)


async def unary_yields(request: Text, context: Context) -> AsyncIterator[Text]:
    for i in range(3):
        yield text(f"{i}:{request.value}")


async def unary_writes(request: Text, context: Context) -> None:
    for i in range(3):
        await context.write(text(f"{i}:{request.value}"))


async def unary_writes_then_fails(request: Text, context: Context) -> None:
    await context.write(text("first"))
    raise LookupError("the writer failed after one response")


async def stream_returns(requests: AsyncIterator[Text], context: Context) -> Text:
    return text("+".join([r.value async for r in requests]))


async def stream_yields(requests: AsyncIterator[Text], context: Context) -> AsyncIterator[Text]:
    async for request in requests:
        yield text("echo:" + request.value)


async def stream_writes(requests: AsyncIterator[Text], context: Context) -> None:
    async for request in requests:
        await context.write(text("echo:" + request.value))


_CODEC: dict[str, Any] = {
    "request_deserializer": Text.FromString,
    "response_serializer": Text.SerializeToString,
}
HANDLERS: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
    "UnaryReturns": grpc.unary_unary_rpc_method_handler(unary_returns, **_CODEC),
    "UnaryYields": grpc.unary_stream_rpc_method_handler(unary_yields, **_CODEC),
    "UnaryWrites": grpc.unary_stream_rpc_method_handler(unary_writes, **_CODEC),
    "UnaryWritesThenFails": grpc.unary_stream_rpc_method_handler(unary_writes_then_fails, **_CODEC),
    "StreamReturns": grpc.stream_unary_rpc_method_handler(stream_returns, **_CODEC),
    "StreamYields": grpc.stream_stream_rpc_method_handler(stream_yields, **_CODEC),
    "StreamWrites": grpc.stream_stream_rpc_method_handler(stream_writes, **_CODEC),
}


class RecordingScope(ScopedInterceptor):
    """Records each call's entry and exit, and the exception that left the behaviour."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str | None]] = []

    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: Any) -> AsyncIterator[None]:
        name = method.rsplit("/", 1)[-1]
        self.events.append(("enter", name, None))
        try:
            yield
        except Exception as exc:
            self.events.append(("exit", name, type(exc).__name__))
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "mapped by the scope")
        else:
            self.events.append(("exit", name, None))


@pytest.fixture
async def kinds_server() -> AsyncIterator[tuple[str, RecordingScope]]:
    recorder = RecordingScope()
    server = grpc.aio.server(interceptors=[recorder, MalformedRequestInterceptor()])
    generic = grpc.method_handlers_generic_handler("kinds.Kinds", HANDLERS)
    server.add_generic_rpc_handlers((generic,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", recorder
    finally:
        await server.stop(None)


def _method(channel: grpc.aio.Channel, kind: str, name: str) -> Any:
    return getattr(channel, kind)(
        f"/kinds.Kinds/{name}",
        request_serializer=Text.SerializeToString,
        response_deserializer=Text.FromString,
    )


async def _requests() -> AsyncIterator[Text]:
    for part in ("a", "b"):
        yield text(part)


async def test_every_handler_kind_answers_through_the_interceptors(
    kinds_server: tuple[str, RecordingScope],
) -> None:
    target, recorder = kinds_server
    async with grpc.aio.insecure_channel(target) as channel:
        unary = _method(channel, "unary_unary", "UnaryReturns")
        assert (await unary(text("x"), timeout=5)).value == "u:x"
        for name in ("UnaryYields", "UnaryWrites"):
            call = _method(channel, "unary_stream", name)(text("x"), timeout=5)
            assert [r.value async for r in call] == ["0:x", "1:x", "2:x"], name
        stream_unary = _method(channel, "stream_unary", "StreamReturns")
        assert (await stream_unary(_requests(), timeout=5)).value == "a+b"
        for name in ("StreamYields", "StreamWrites"):
            call = _method(channel, "stream_stream", name)(_requests(), timeout=5)
            assert [r.value async for r in call] == ["echo:a", "echo:b"], name
    # Each call was inside its scope from start to end, one after the other.
    expected: list[tuple[str, str, str | None]] = []
    for name in HANDLERS:
        if name != "UnaryWritesThenFails":
            expected += [("enter", name, None), ("exit", name, None)]
    assert recorder.events == expected


async def test_a_writer_that_fails_is_mapped_by_the_scope(
    kinds_server: tuple[str, RecordingScope],
) -> None:
    """The writer's exception reaches the scope (which maps it, as ErrorMappingInterceptor
    does) after the response it wrote: nothing is lost or swallowed by a wrapper."""
    target, recorder = kinds_server
    async with grpc.aio.insecure_channel(target) as channel:
        call = _method(channel, "unary_stream", "UnaryWritesThenFails")(text("x"), timeout=5)
        assert (await call.read()).value == "first"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call.read()
    assert failed.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert recorder.events == [
        ("enter", "UnaryWritesThenFails", None),
        ("exit", "UnaryWritesThenFails", "LookupError"),
    ]


async def test_health_watch_answers_on_the_real_server(pg_server: RunningServer) -> None:
    async with grpc.aio.insecure_channel(pg_server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""))
        first = await asyncio.wait_for(watch.read(), 10)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        unknown = stub.Watch(health_pb2.HealthCheckRequest(service="no.such.Service"))
        reply = await asyncio.wait_for(unknown.read(), 10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        watch.cancel()
        unknown.cancel()


_entered_by: contextvars.ContextVar[str | None] = contextvars.ContextVar("entered_by", default=None)


class TaskRecordingScope(ScopedInterceptor):
    """Records, at each exit, whether it ran in the task and context its entry ran in."""

    def __init__(self) -> None:
        self.exits: list[tuple[bool, str | None]] = []

    @asynccontextmanager
    async def scope(self, method: str, context: Context, request: Any) -> AsyncIterator[None]:
        task = asyncio.current_task()
        _entered_by.set(method)
        try:
            yield
        finally:
            self.exits.append((asyncio.current_task() is task, _entered_by.get()))


async def yields_until_cancelled(request: Text, context: Context) -> AsyncIterator[Text]:
    while True:  # more than flow control lets through: the server ends up waiting to send
        yield text("x" * 65536)


async def test_a_stream_cancelled_while_waiting_to_send_leaves_its_scopes_in_its_own_task() -> None:
    """grpc.aio abandons a response generator whose call is cancelled at a yield; the
    event loop would close it later, in another task and context, where per-call state
    (the call context, the request log's record, the capacity count) is not there. The
    wrappers write what the behaviour yields themselves and close it in the call's task."""
    recorder = TaskRecordingScope()
    server = grpc.aio.server(interceptors=[recorder])
    handler = grpc.unary_stream_rpc_method_handler(yields_until_cancelled, **_CODEC)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("kinds.Kinds", {"Endless": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for _ in range(3):
                call = _method(channel, "unary_stream", "Endless")(text("x"), timeout=30)
                assert (await call.read()).value.startswith("x")
                call.cancel()
                await eventually(lambda: len(recorder.exits) > 0, what="the scope exited")
                assert recorder.exits.pop() == (True, "/kinds.Kinds/Endless")
    finally:
        await server.stop(None)
