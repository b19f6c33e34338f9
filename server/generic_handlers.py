"""Services join the server as generic handlers only, never as registered methods.

The generated ``add_*Servicer_to_server`` functions (Ferrule's, health's, reflection's)
hand each service to the server twice: as a generic handler and as *registered methods*.
A grpc.aio server keeps one pending request per registered method and, each time a call
arrives, waits on all of them at once (``asyncio.wait(..., FIRST_COMPLETED)`` in its main
loop). With every Ferrule, health and reflection method registered, that wait walks
dozens of futures per call on the event loop, a large share of a cached read's server
CPU (``make bench BENCH_ARGS="reads --reads-views h2load"`` shows it against a bare
grpc.aio server). A generic handler is found by one lookup per service instead, and grpc.aio
falls back to it for every method, so nothing else changes: same handlers, same
interceptors, same statuses.

:class:`GenericHandlersOnly` is the server the generated functions see: it forwards what
they register generically and keeps the base class's do-nothing
``add_registered_method_handlers`` (registration is optional in grpc.aio's API).

It also gives every handler it forwards a response serializer that sends a
:class:`Serialized` reply as it is: a cached Get's reply is stored serialized, and
parsing it only for grpc to serialize it again costs a parse and a serialization per hit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

import grpc
from google.protobuf.message import Message

from server.interceptors.scoped import Handler, rebuild, shape_of

M = TypeVar("M", bound=Message)


class Serialized:
    """A reply already in wire form: the response serializers of the services
    (:class:`GenericHandlersOnly`) send ``data`` as it is. Whoever reads it in process
    (an interceptor, a test) reads the message: any attribute is the parsed message's,
    parsed once on first use."""

    __slots__ = ("_message", "_type", "data")

    def __init__(self, response_type: type[Message], data: bytes) -> None:
        self.data = data
        self._type = response_type
        self._message: Message | None = None

    def __getattr__(self, name: str) -> Any:  # only for what the slots do not hold
        message = self._message
        if message is None:
            message = self._message = self._type.FromString(self.data)
        return getattr(message, name)


def serialized_reply(response_type: type[M], data: bytes) -> M:
    """``data``, a serialized ``response_type``, as a handler's reply of that type: sent as
    it is, read in process as the message (see :class:`Serialized`)."""
    return cast(M, Serialized(response_type, data))


def _passing_serialized(
    serialize: Callable[[Any], bytes] | None,
) -> Callable[[Any], bytes] | None:
    if serialize is None:
        return None

    def serializer(response: Any) -> bytes:
        if type(response) is Serialized:
            return response.data
        return serialize(response)

    return serializer


class _ServingSerialized(grpc.GenericRpcHandler):
    """``generic``'s handlers with response serializers that pass :class:`Serialized`
    replies through; each method's built once."""

    def __init__(self, generic: grpc.GenericRpcHandler) -> None:
        self._generic = generic
        self._handlers: dict[str, Handler] = {}

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is None:
            found = self._generic.service(handler_call_details)
            if found is None:
                return None  # not remembered: the table holds only served methods
            handler = self._handlers[method] = _passing(found)
        return handler


def _passing(handler: Handler) -> Handler:
    return rebuild(
        handler,
        getattr(handler, shape_of(handler)),
        response_serializer=_passing_serialized(handler.response_serializer),
    )


class GenericHandlersOnly(grpc.aio.Server):
    """A registration view of ``server``: generic handlers reach it, registered methods
    do not. Only for adding services; serve through ``server`` itself."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(
            [_ServingSerialized(generic) for generic in generic_rpc_handlers]
        )

    def add_insecure_port(self, address: str) -> int:
        raise TypeError("a registration view opens no port: use the server itself")

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise TypeError("a registration view opens no port: use the server itself")

    async def start(self) -> None:
        raise TypeError("a registration view does not serve: start the server itself")

    async def stop(self, grace: float | None) -> None:
        raise TypeError("a registration view does not serve: stop the server itself")

    async def wait_for_termination(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109 (grpc.aio's signature)
        raise TypeError("a registration view does not serve: wait on the server itself")
