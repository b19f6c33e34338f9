"""The request log (the seeds' `api_requests`): every RPC recorded off the critical path.

The interceptor only appends to a bounded in-memory queue; a background task writes
what accumulated in one transaction per batch (on PostgreSQL, one INSERT). When the
database falls behind, the queue fills and new entries are dropped (and counted) rather
than slowing RPCs down.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from db.repositories.request_log import LoggedCall
from server.call_context import current_call, metadata_value
from server.input_boundary import loggable
from server.interceptors.scoped import (
    Context,
    Handler,
    ScopeContextManager,
    SyncScopedInterceptor,
    SyncScopeFactory,
    exit_status,
)

log = logging.getLogger("ferrule.request_log")


WriteBatch = Callable[[list[LoggedCall]], Awaitable[None]]


class RequestLogWriter:
    def __init__(
        self,
        write_batch: WriteBatch,
        *,
        max_queue: int = 50_000,
        max_batch: int = 1_000,
        flush_interval: float = 0.5,
    ) -> None:
        self._write_batch = write_batch
        # A deque and an event rather than an asyncio.Queue: every RPC appends one entry,
        # and the queue's per-item bookkeeping (and waking its getter) would be paid per
        # call; here the writer is woken only when the first entry of a batch arrives.
        self._pending: deque[LoggedCall] = deque()
        self._arrived = asyncio.Event()
        self._max_queue = max_queue
        self._max_batch = max_batch
        self._flush_interval = flush_interval
        self._task: asyncio.Task[None] | None = None
        #: The batch write under way, apart from the task so that stopping waits for it
        #: rather than cancelling it half-way.
        self._writing: asyncio.Future[None] | None = None
        self.dropped = 0
        self.written = 0
        self.failed_batches = 0

    def record(self, entry: LoggedCall) -> None:
        pending = self._pending
        if len(pending) >= self._max_queue:
            self.dropped += 1
            return
        if not pending:
            self._arrived.set()
        pending.append(entry)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="request-log-writer")

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            if len(self._pending) < self._max_batch:
                await asyncio.sleep(self._flush_interval)  # let a batch accumulate
            # A full batch is written at once: waiting the interval between full batches
            # would cap the log at max_batch entries per interval whatever the database
            # can take, and a server answering faster than that would fill the queue and
            # drop entries.
            self._writing = asyncio.ensure_future(self._write(self._take()))
            await asyncio.shield(self._writing)
            self._writing = None

    def _take(self) -> list[LoggedCall]:
        """Up to a batch of the oldest entries."""
        pending = self._pending
        return [pending.popleft() for _ in range(min(len(pending), self._max_batch))]

    async def _write(self, batch: list[LoggedCall]) -> None:
        try:
            await self._write_batch(batch)
        except asyncio.CancelledError:
            self._lost(len(batch), "cancelled while being written")
            raise
        except Exception as exc:
            self._failed(batch, exc)
        else:
            self.written += len(batch)

    def _failed(self, batch: list[LoggedCall], exc: BaseException) -> None:
        # The request log is diagnostics: losing a batch must not take the server down.
        self.failed_batches += 1
        log.warning("request log batch of %d entries not written", len(batch), exc_info=exc)

    def _lost(self, count: int, why: str) -> None:
        self.dropped += count
        log.warning("request log: %d entries not written (%s)", count, why)

    async def stop(self, grace: float) -> None:
        """Stop the background task and write whatever is still queued, for at most
        ``grace`` seconds: a stalled database must not hold the server's shutdown. What is
        not written by then is counted in ``dropped`` and logged, never lost silently."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        if self._task is not None:
            self._task.cancel()  # waiting for entries, or for the write below
            # asyncio.wait returns at the deadline even if the task is still unwinding.
            await asyncio.wait({self._task}, timeout=grace)
            self._task = None
        writing, self._writing = self._writing, None
        if writing is not None and not writing.done():
            # A batch already on its way: let it land rather than lose it half-written.
            done, _ = await asyncio.wait({writing}, timeout=max(deadline - loop.time(), 0))
            if not done:
                writing.cancel()  # counted as lost by _write once it unwinds
                await asyncio.wait({writing}, timeout=grace)
        while self._pending:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            batch = self._take()
            write = asyncio.ensure_future(self._write_batch(batch))
            done, _ = await asyncio.wait({write}, timeout=remaining)
            if not done:
                write.cancel()
                self._lost(len(batch), "a write still waiting at the end of the grace period")
                break
            error = write.exception()
            if error is None:
                self.written += len(batch)
            else:
                self._failed(batch, error)
        unwritten = len(self._pending)
        self._pending.clear()
        if unwritten:
            self._lost(unwritten, f"still queued after the {grace:.1f} s grace period")


class RequestLogInterceptor(SyncScopedInterceptor):
    def __init__(self, writer: RequestLogWriter) -> None:
        self._writer = writer

    def scope_factory(self, method: str, handler: Handler) -> SyncScopeFactory:
        writer = self._writer
        return lambda context, request: _LogScope(writer, method, context)


class _LogScope(ScopeContextManager):
    """Records one call's entry when it ends."""

    __slots__ = ("_call", "_context", "_method", "_peer", "_started", "_user_agent", "_writer")

    def __init__(self, writer: RequestLogWriter, method: str, context: Context) -> None:
        self._writer = writer
        self._method = method
        self._context = context

    def enter(self) -> None:
        context = self._context
        # Read the call's peer and metadata now: once a cancelled call is finished, grpc.aio
        # may have released the C call object, and context.peer() then crashes the process.
        self._peer = context.peer()
        # Taken on entry, in the call's context: the exit may run in another one.
        call = self._call = current_call()
        self._user_agent = metadata_value(call.metadata, "user-agent")
        self._started = time.perf_counter()

    def exit(self, exc: BaseException | None) -> None:
        code, _ = exit_status(self._context, exc)
        elapsed = time.perf_counter() - self._started
        call = self._call
        user_agent = self._user_agent
        self._writer.record(
            LoggedCall(  # positional, in the order of its fields: the cheapest to build
                self._method,
                call.principal.subject if call.principal else None,
                call.organization_id,
                # Recorded, not refused: what a text column cannot hold is replaced.
                loggable(self._peer),
                None if user_agent is None else loggable(user_agent),
                code.name,
                elapsed * 1000,
                call.request_bytes,
                call.trace_id,
                datetime.now(UTC),
            )
        )
