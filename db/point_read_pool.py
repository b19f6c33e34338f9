"""The connections that session-scoped point reads run on (:mod:`db.point_reads`).

Why a pool of its own rather than a library's: a point read is one statement, so its
checkout and return are a large share of it, and both pools at hand cost more than the
read's own Python. SQLAlchemy's ``QueuePool`` behind ``AsyncEngine.raw_connection``
takes a greenlet switch each way (dearer the deeper the caller's stack) around its own
bookkeeping; ``asyncpg.Pool`` builds a proxy and a future per acquire and a shielded
task and an idle timer per release. This free list costs next to nothing; the figures
and the benchmark that measured them are in the README ("Why a pool of our own").
The job is small because these connections do one thing: they are read-only for their
whole session, run single statements in autocommit, and keep no state but the tenant
settings that :mod:`db.point_reads` tracks on them.

What it keeps of a pool: at most ``size`` connections; a borrower waits first come, first
served, at most ``timeout`` seconds (then :class:`~db.errors.DatabaseUnavailableError`,
as when the main pool is exhausted); connections are made by SQLAlchemy (``engine``, a
pool-less engine), so they get the dialect's type codecs, TLS and server settings like
every other connection; a connection that closed (the server restarted, a backend was
terminated) is replaced, one idle for ``ping_idle_seconds`` is pinged before use, one
older than ``recycle_seconds`` is retired; closing waits at most ``close_timeout``.
Connections are returned even after a cancelled or timed-out statement: asyncpg makes
the next statement wait until the server has acknowledged the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine

from db.errors import DatabaseUnavailableError

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class PointReadConnection:
    """One pooled connection and what the pool and the point reads keep about it."""

    #: The asyncpg connection.
    driver: Any
    opened: float
    #: When it was last returned (``time.monotonic()``).
    returned: float
    #: The session settings it carries, as :mod:`db.point_reads` last set them.
    settings: tuple[str, str, str] | None = None
    #: For the statement observer (the checkout's wait, claimed by the first statement).
    info: dict[Any, Any] = field(default_factory=dict)


class PointReadPool:
    def __init__(
        self,
        engine: AsyncEngine,
        *,
        size: int,
        timeout: float,
        recycle_seconds: float,
        ping_idle_seconds: float | None,
        close_timeout: float = 5.0,
    ) -> None:
        if size < 1:
            raise ValueError("a point-read pool needs at least one connection")
        #: Makes the connections (a pool-less engine); its observer comments and times
        #: the statements run on them.
        self.engine = engine
        self._size = size
        self._timeout = timeout
        self._recycle = recycle_seconds
        self._ping_idle = ping_idle_seconds
        self.close_timeout = close_timeout
        self._free: deque[PointReadConnection] = deque()
        # A waiter gets a connection, or None: a slot freed up, open a connection in it.
        self._waiters: deque[asyncio.Future[PointReadConnection | None]] = deque()
        #: Connections open or being opened.
        self._open = 0
        self._closed = False
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def size(self) -> int:
        return self._size

    @property
    def checked_out(self) -> int:
        """Connections lent out now (or being opened for a borrower)."""
        return self._open - len(self._free)

    async def checkout(self) -> PointReadConnection:
        """A connection, for :meth:`checkin` to take back; waits for one when all are lent."""
        while True:
            if self._closed:
                raise DatabaseUnavailableError("the database pool is closed")
            connection = self._take_free()
            if connection is None:
                if self._open < self._size:
                    return await self._connect()
                connection = await self._wait()
                if connection is None:
                    continue  # a slot freed up: open a connection in it, if still free
            if self._ping_idle is None or (
                time.monotonic() - connection.returned < self._ping_idle
            ):
                return connection
            # Idle long enough for the server to have gone away (a restart, say).
            try:
                await connection.driver.execute("SELECT 1")
            except Exception:
                self._discard(connection)
                continue
            except BaseException:
                self.checkin(connection)
                raise
            return connection

    def checkin(self, connection: PointReadConnection) -> None:
        """Take back a connection :meth:`checkout` lent, whatever its last statement did."""
        driver = connection.driver
        if self._closed or driver.is_closed() or driver.is_in_transaction():
            # A transaction cannot have been opened by a single autocommit statement;
            # should one be, the connection goes rather than carry it to the next reader.
            self._discard(connection)
            return
        connection.returned = time.monotonic()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(connection)
                return
        self._free.append(connection)

    async def close(self, goodbye_seconds: float) -> None:
        """Close every connection not lent out, waiting at most ``goodbye_seconds`` for each
        goodbye; those lent out close when returned."""
        self._closed = True
        self.close_timeout = goodbye_seconds
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
        while self._free:
            self._discard(self._free.popleft())
        if self._closing:
            await asyncio.wait(set(self._closing))

    # --- internals ---------------------------------------------------------------------
    def _take_free(self) -> PointReadConnection | None:
        now = time.monotonic()
        while self._free:
            connection = self._free.popleft()
            if connection.driver.is_closed() or now - connection.opened >= self._recycle:
                self._discard(connection)
                continue
            return connection
        return None

    async def _wait(self) -> PointReadConnection | None:
        waiter: asyncio.Future[PointReadConnection | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout(self._timeout):
                return await waiter
        except BaseException as exc:
            # Cancelled or timed out just as a connection (or a free slot) was handed
            # over: pass it on rather than lose it.
            if waiter.done() and not waiter.cancelled():
                handed = waiter.result()
                if handed is not None:
                    self.checkin(handed)
                else:
                    self._wake_one()
            else:
                waiter.cancel()
            if isinstance(exc, TimeoutError):
                raise DatabaseUnavailableError(
                    "no database connection became free in time"
                ) from None
            raise

    async def _connect(self) -> PointReadConnection:
        self._open += 1
        try:
            pooled = await self.engine.raw_connection()
            driver = pooled.driver_connection
            # Ours from here on: SQLAlchemy's pool-less engine forgets it.
            pooled.detach()
        except BaseException:
            self._open -= 1
            self._wake_one()
            raise
        now = time.monotonic()
        return PointReadConnection(driver, opened=now, returned=now)

    def _discard(self, connection: PointReadConnection) -> None:
        self._open -= 1
        task = asyncio.get_running_loop().create_task(self._close(connection))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
        self._wake_one()

    async def _close(self, connection: PointReadConnection) -> None:
        driver = connection.driver
        if driver.is_closed():
            return
        try:
            await driver.close(timeout=self.close_timeout)
        except Exception:
            # Still unanswered (or the connection broke while saying goodbye): drop it.
            with contextlib.suppress(Exception):
                driver.terminate()

    def _wake_one(self) -> None:
        """A slot freed up: the first waiter opens a connection in it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
