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
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc


class GenericHandlersOnly(grpc.aio.Server):
    """A registration view of ``server``: generic handlers reach it, registered methods
    do not. Only for adding services; serve through ``server`` itself."""

    def __init__(self, server: grpc.aio.Server) -> None:
        self._server = server

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Iterable[grpc.GenericRpcHandler]
    ) -> None:
        self._server.add_generic_rpc_handlers(generic_rpc_handlers)

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
