"""A real grpc.aio server on 127.0.0.1, in its own thread and event loop.

Its own loop lets blocking (sync) clients call it from plain test functions, and asyncio
clients call it from the session loop, against the very same server.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

import grpc
from grpc import aio

_T = TypeVar("_T")

Register = Callable[[aio.Server], None]


class ServerThread:
    """Starts ``grpc.aio.server()`` with the servicers ``register`` adds, on a free port."""

    def __init__(self, register: Register, credentials: grpc.ServerCredentials | None = None):
        self._register = register
        self._credentials = credentials
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: aio.Server | None = None
        self.port = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=30)

    async def _start(self) -> int:
        server = aio.server()
        self._register(server)
        if self._credentials is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", self._credentials)
        await server.start()
        self._server = server
        return port

    async def _stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self.port = self._run(self._start())
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._run(self._stop())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=30)
            self._loop.close()
