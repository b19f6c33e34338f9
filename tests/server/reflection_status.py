"""The final status a server gives a reflection stream that the client opens and never
writes to: for refusals decided when the call arrives (the method is not served, the
anonymous-stream budget is spent). Nothing is written on purpose: a write racing the
server's early answer fails on the client with grpc's own INTERNAL, not the status the
server sent."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_reflection.v1alpha import reflection_pb2_grpc


async def reflection_status(channel: grpc.aio.Channel) -> grpc.StatusCode:
    stream: Any = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo()
    async with asyncio.timeout(10):
        code: grpc.StatusCode = await stream.code()
    return code
