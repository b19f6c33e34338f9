"""A reply already in wire form (a cached Get's stored bytes) is sent as it is, and reads
as its message wherever it is looked at in process."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2

from server.generic_handlers import GenericHandlersOnly, Serialized, serialized_reply

Text = wrappers_pb2.StringValue


def test_a_serialized_reply_reads_as_its_message() -> None:
    reply = serialized_reply(Text, Text(value="stored").SerializeToString())
    assert isinstance(reply, Serialized)
    assert reply.value == "stored"
    assert reply.SerializeToString() == Text(value="stored").SerializeToString()


async def stored(request: Text, context: Any) -> Text:
    return serialized_reply(Text, Text(value="stored:" + request.value).SerializeToString())


async def built(request: Text, context: Any) -> Text:
    return Text(value="built:" + request.value)


async def test_served_replies_arrive_alike_whether_serialized_or_built() -> None:
    server = grpc.aio.server()
    codec: dict[str, Any] = {
        "request_deserializer": Text.FromString,
        "response_serializer": Text.SerializeToString,
    }
    handlers = {
        "Stored": grpc.unary_unary_rpc_method_handler(stored, **codec),
        "Built": grpc.unary_unary_rpc_method_handler(built, **codec),
    }
    GenericHandlersOnly(server).add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("replies.Replies", handlers),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            for name in ("Stored", "Built"):
                call = channel.unary_unary(
                    f"/replies.Replies/{name}",
                    request_serializer=Text.SerializeToString,
                    response_deserializer=Text.FromString,
                )
                assert await call(Text(value="x")) == Text(value=f"{name.lower()}:x")
            missing = channel.unary_unary(
                "/replies.Replies/Missing",
                request_serializer=Text.SerializeToString,
                response_deserializer=Text.FromString,
            )
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await missing(Text(value="x"))
            assert refused.value.code() is grpc.StatusCode.UNIMPLEMENTED
    finally:
        await server.stop(None)
