"""Exactly-once streaming of predictions over ``PredictionService.StreamPredictions``.

:class:`AsyncPredictionStreamer` (asyncio) and :class:`PredictionStreamer` (blocking)
batch rows, keep at most ``max_in_flight`` batches unacknowledged, match each
acknowledgement to its batch, and when the stream breaks (server restart, connection
reset, UNAVAILABLE) reconnect with exponential backoff and re-send every batch not yet
acknowledged, with the same batch id and the same rows in the same order. The server
recognises a re-sent batch (and rows whose id exists), so each row is stored once:

>>> async with AsyncPredictionStreamer(client, "organizations/...") as streamer:
...     for row in rows:
...         await streamer.add(prediction_service_pb2.Prediction(...))
...     totals = await streamer.flush()   # every row acknowledged (durable) here
>>> totals.accepted, totals.duplicates, totals.rejected

Rows without ``name`` get a server-derived id from (batch id, index), which is why a
batch is never re-cut: it is re-sent exactly as it was first sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from grpc import aio

from ferrule.client.aio import AsyncFerruleClient
from ferrule.client.config import ClientConfig, channel_credentials, channel_options
from ferrule.client.errors import FerruleError, from_rpc_error
from ferrule.client.outgoing import OutgoingPolicy
from ferrule.v1 import prediction_service_pb2 as pb
from ferrule.v1 import prediction_service_pb2_grpc

if TYPE_CHECKING:
    from ferrule.client.sync import FerruleClient

__all__ = [
    "RECONNECT_CODES",
    "AckMismatch",
    "AsyncPredictionStreamer",
    "IngestTotals",
    "PredictionStreamer",
    "RejectedRow",
    "StreamBroken",
]

_T = TypeVar("_T")

#: Statuses after which the stream is re-opened and unacknowledged batches re-sent.
#: Everything else (INVALID_ARGUMENT, PERMISSION_DENIED, ...) is the caller's to fix.
RECONNECT_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)


def _reconnectable(error: FerruleError) -> bool:
    """RECONNECT_CODES, plus INTERNAL/UNKNOWN raised by gRPC itself rather than sent by
    the server (no Ferrule error details). grpc.aio marks a call INTERNAL ("Internal
    error from Core") when a write fails, which happens when the write races the
    server's own status: the real status is lost. Retrying is safe, and a deterministic
    server error (INVALID_ARGUMENT, ...) shows its true code on a later attempt."""
    if isinstance(error, AckMismatch):
        return False
    if error.code in RECONNECT_CODES:
        return True
    transport = error.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
    return transport and error.domain != "ferrule"


class AckMismatch(FerruleError):
    """The server acknowledged a batch other than the oldest unacknowledged one (a
    broken server or proxy); nothing can be trusted on that stream."""

    code = grpc.StatusCode.INTERNAL


class StreamBroken(FerruleError):
    """The stream could not be re-established: ``max_attempts`` attempts in a row made
    no progress. Batches not acknowledged may or may not have been stored; re-sending
    them (same ids, same rows) later is safe."""


@dataclass(frozen=True, slots=True)
class RejectedRow:
    """A row the server refused (not stored), with why."""

    batch_id: str
    #: Position in its batch.
    index: int
    #: Position among every row given to the streamer (0-based).
    row_number: int
    #: ``(field, description, reason)`` per violation.
    violations: tuple[tuple[str, str, str], ...]


@dataclass(slots=True)
class IngestTotals:
    """What the server acknowledged so far (acknowledged rows are durable)."""

    accepted: int = 0
    duplicates: int = 0
    rejected: list[RejectedRow] = field(default_factory=list)
    batches: int = 0
    #: Times the stream was re-opened after a failure.
    reconnects: int = 0

    @property
    def rows(self) -> int:
        return self.accepted + self.duplicates + len(self.rejected)


@dataclass(slots=True)
class _Outgoing:
    request: pb.StreamPredictionsRequest
    first_row: int
    size: int


_METHOD = "/ferrule.v1.PredictionService/StreamPredictions"

AckCallback = Callable[[pb.StreamPredictionsResponse], None]


class AsyncPredictionStreamer:
    """Streams predictions for one parent; see the module docs. Use inside the loop of
    ``client``, as an async context manager or with an explicit :meth:`close`."""

    def __init__(
        self,
        client: AsyncFerruleClient,
        parent: str,
        *,
        batch_size: int = 1000,
        max_in_flight: int = 8,
        max_attempts: int = 8,
        initial_backoff: float = 0.1,
        max_backoff: float = 5.0,
        stream_timeout: float | None = 3600.0,
        batch_id_prefix: str | None = None,
        on_ack: AckCallback | None = None,
    ) -> None:
        """
        Args:
            batch_size: rows per batch (1..1000, the server's limit).
            max_in_flight: unacknowledged batches at most (the server reads ahead 8).
            max_attempts: consecutive stream attempts without an acknowledgement
                before giving up with :class:`StreamBroken`.
            stream_timeout: deadline of each stream; when it expires the streamer simply
                opens a new one (None: no deadline).
            batch_id_prefix: batch ids are ``{prefix}-{n}``; default a fresh UUID, so ids
                are unique per organization as the contract asks.
            on_ack: called with every acknowledgement, in order, after totals update.
        """
        if not 1 <= batch_size <= 1000:
            raise ValueError("batch_size must be between 1 and 1000")
        if max_in_flight < 1 or max_attempts < 1:
            raise ValueError("max_in_flight and max_attempts must be positive")
        # A channel of its own, configured like the client's but (1) without the retry
        # policy: the streamer re-sends on its own terms (the unacknowledged batches, on
        # a new stream), and gRPC's transparent retries would replay and hide attempts
        # underneath it; (2) without the interceptors: their request queue turns a write
        # that races the stream's failure into a local INTERNAL error that hides the
        # server's status. Token, trace context and typed errors are applied here instead.
        # It also keeps a busy ingest connection apart from the client's other calls.
        config = dataclasses.replace(client.config, max_attempts=1)
        self._policy = OutgoingPolicy.from_config(config)
        credentials = channel_credentials(config)
        if credentials is None:
            self._channel = aio.insecure_channel(config.target, options=channel_options(config))
        else:
            self._channel = aio.secure_channel(
                config.target, credentials, options=channel_options(config)
            )
        self._stub = prediction_service_pb2_grpc.PredictionServiceStub(self._channel)
        self.parent = parent
        self.batch_size = batch_size
        self.max_in_flight = max_in_flight
        self.max_attempts = max_attempts
        self.initial_backoff = initial_backoff
        self.max_backoff = max_backoff
        self.stream_timeout = stream_timeout
        self._prefix = batch_id_prefix or str(uuid.uuid4())
        self._on_ack = on_ack
        self.totals = IngestTotals()
        self._buffer: list[pb.Prediction] = []
        self._rows_added = 0
        self._batches_made = 0
        #: Every batch sent (or about to be) and not yet acknowledged, in order.
        self._unacked: deque[_Outgoing] = deque()
        #: How many of ``_unacked`` (from the front) went out on the current stream.
        self._sent = 0
        self._changed = asyncio.Condition()
        self._error: BaseException | None = None
        self._closing = False
        self._runner: asyncio.Task[None] | None = None
        self._call: Any = None

    # --- public API -------------------------------------------------------------------
    async def add(self, prediction: pb.Prediction) -> None:
        """Queue one row; sends a batch when ``batch_size`` rows are buffered (and waits
        while ``max_in_flight`` batches are unacknowledged)."""
        self._buffer.append(prediction)
        if len(self._buffer) >= self.batch_size:
            await self._send_buffer()

    async def add_many(self, predictions: Iterable[pb.Prediction]) -> None:
        for prediction in predictions:
            self._buffer.append(prediction)
            if len(self._buffer) >= self.batch_size:
                await self._send_buffer()

    async def send_batch(
        self, predictions: Sequence[pb.Prediction], batch_id: str | None = None
    ) -> str:
        """Send ``predictions`` (at most 1000) as one batch now; returns its batch id.
        Rows buffered by :meth:`add` are sent first, to keep the order."""
        if self._buffer:
            await self._send_buffer()
        return await self._submit(list(predictions), batch_id)

    async def flush(self) -> IngestTotals:
        """Send the buffered rows and wait until every batch is acknowledged."""
        if self._buffer:
            await self._send_buffer()
        async with self._changed:
            await self._changed.wait_for(lambda: not self._unacked or self._error is not None)
        self._raise_error()
        return self.totals

    async def close(self) -> IngestTotals:
        """Send the buffered rows, end the stream (half-close) and wait until the server
        has acknowledged every batch and closed it. The streamer is done afterwards."""
        try:
            if self._buffer:
                await self._send_buffer()
        finally:
            self._closing = True
            async with self._changed:
                self._changed.notify_all()
            if self._runner is not None:
                await self._runner  # stores its failure in _error rather than raising
                self._runner = None
            await self._channel.close()
        self._raise_error()
        return self.totals

    async def abort(self) -> None:
        """Stop at once without waiting for acknowledgements (they may be lost)."""
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(BaseException):
                await self._runner
            self._runner = None
        await self._channel.close()

    @property
    def unacknowledged(self) -> int:
        return len(self._unacked)

    async def __aenter__(self) -> AsyncPredictionStreamer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            await self.close()
        else:
            await self.abort()

    # --- batching ---------------------------------------------------------------------
    async def _send_buffer(self) -> None:
        rows, self._buffer = self._buffer, []
        await self._submit(rows, None)

    async def _submit(self, rows: list[pb.Prediction], batch_id: str | None) -> str:
        if len(rows) > 1000:
            raise ValueError("a batch holds at most 1000 predictions")
        if self._closing:
            raise RuntimeError("the streamer is closed")
        self._raise_error()
        if batch_id is None:
            batch_id = f"{self._prefix}-{self._batches_made}"
        self._batches_made += 1
        request = pb.StreamPredictionsRequest(
            parent=self.parent, batch_id=batch_id, predictions=rows
        )
        outgoing = _Outgoing(request, self._rows_added, len(rows))
        self._rows_added += len(rows)
        async with self._changed:
            await self._changed.wait_for(
                lambda: len(self._unacked) < self.max_in_flight or self._error is not None
            )
            self._raise_error()
            self._unacked.append(outgoing)
            self._changed.notify_all()
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run())
        return batch_id

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    # --- the connection ---------------------------------------------------------------
    async def _run(self) -> None:
        """Open streams until closed; re-send what is unacknowledged after each failure."""
        failures = 0
        try:
            while True:
                acked_before = self.totals.batches
                try:
                    await self._stream_once()
                    if self._closing:
                        return  # half-closed and drained
                    raise FerruleError(  # the server ended the stream early: open another
                        "the server ended the stream", code=grpc.StatusCode.UNAVAILABLE
                    )
                except FerruleError as exc:
                    if not _reconnectable(exc):
                        raise
                    failure: FerruleError = exc
                except aio.AioRpcError as exc:
                    typed = from_rpc_error(exc)
                    if not _reconnectable(typed):
                        raise typed from exc
                    failure = typed
                failures = 0 if self.totals.batches > acked_before else failures + 1
                if failures >= self.max_attempts:
                    raise StreamBroken(
                        f"no acknowledgement after {failures} attempts: {failure}",
                        code=failure.code,
                    ) from failure
                self.totals.reconnects += 1
                delay = min(self.max_backoff, self.initial_backoff * 2 ** max(failures - 1, 0))
                await asyncio.sleep(delay * (0.5 + random.random() / 2))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._error = exc
            async with self._changed:
                self._changed.notify_all()

    async def _stream_once(self) -> None:
        span = self._policy.start_span(_METHOD)
        call = self._stub.StreamPredictions(
            timeout=self.stream_timeout, metadata=self._policy.metadata(None, span)
        )
        self._call = call
        self._sent = 0
        sender = asyncio.create_task(self._send(call))
        try:
            # Iterated, not read(): once the call has its status, read() raises at once
            # and drops acknowledgements still buffered, which would re-send (as
            # duplicates) batches the server had acknowledged before it ended the stream.
            async for response in call:
                assert isinstance(response, pb.StreamPredictionsResponse)
                await self._acknowledged(response)
            if self._unacked:  # the server ended the stream OK while batches were pending
                raise FerruleError(
                    "the stream ended before every batch was acknowledged",
                    code=grpc.StatusCode.UNAVAILABLE,
                )
            span.finish(grpc.StatusCode.OK)
        except aio.AioRpcError as exc:
            typed = from_rpc_error(exc)
            span.finish(typed.code, typed)
            raise typed from exc
        except BaseException as exc:
            span.finish(getattr(exc, "code", grpc.StatusCode.CANCELLED), exc)
            raise
        finally:
            sender.cancel()
            with contextlib.suppress(BaseException):
                await sender
            call.cancel()
            self._call = None

    async def _send(self, call: Any) -> None:
        """Write every batch not yet sent on this stream; half-close once closing and
        everything is written (the server then acknowledges the rest and ends)."""
        while True:
            async with self._changed:
                await self._changed.wait_for(
                    lambda: self._sent < len(self._unacked) or self._closing
                )
                if self._sent >= len(self._unacked):
                    break
                outgoing = self._unacked[self._sent]
            # An acknowledgement arriving during the write shifts ``_unacked`` and
            # ``_sent`` together, so the increment below still points past this batch.
            await call.write(outgoing.request)
            self._sent += 1
        await call.done_writing()

    async def _acknowledged(self, response: pb.StreamPredictionsResponse) -> None:
        async with self._changed:
            if not self._unacked or self._unacked[0].request.batch_id != response.batch_id:
                expected = self._unacked[0].request.batch_id if self._unacked else "none"
                raise AckMismatch(
                    f"acknowledgement for {response.batch_id!r}, expected {expected!r}"
                )
            outgoing = self._unacked.popleft()
            self._sent -= 1
            totals = self.totals
            totals.batches += 1
            totals.accepted += response.accepted
            totals.duplicates += response.duplicates
            for rejected in response.rejected:
                totals.rejected.append(
                    RejectedRow(
                        batch_id=response.batch_id,
                        index=rejected.index,
                        row_number=outgoing.first_row + rejected.index,
                        violations=tuple(
                            (v.field, v.description, v.reason) for v in rejected.violations
                        ),
                    )
                )
            self._changed.notify_all()
        if self._on_ack is not None:
            self._on_ack(response)


class PredictionStreamer:
    """The blocking twin of :class:`AsyncPredictionStreamer`.

    It runs an asyncio streamer on a private event loop in a background thread, with its
    own channel built from the given client's (or config's) settings. Same arguments.
    """

    def __init__(self, client: FerruleClient | ClientConfig, parent: str, **options: Any) -> None:
        config = client if isinstance(client, ClientConfig) else client.config
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="ferrule-ingest", daemon=True
        )
        self._thread.start()

        async def make() -> tuple[AsyncFerruleClient, AsyncPredictionStreamer]:
            aio_client = AsyncFerruleClient(config=config)
            return aio_client, AsyncPredictionStreamer(aio_client, parent, **options)

        self._aio_client, self._streamer = self._call(make())

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    @property
    def totals(self) -> IngestTotals:
        return self._streamer.totals

    def add(self, prediction: pb.Prediction) -> None:
        self._call(self._streamer.add(prediction))

    def add_many(self, predictions: Iterable[pb.Prediction]) -> None:
        self._call(self._streamer.add_many(list(predictions)))

    def send_batch(self, predictions: Sequence[pb.Prediction], batch_id: str | None = None) -> str:
        return self._call(self._streamer.send_batch(predictions, batch_id))

    def flush(self) -> IngestTotals:
        return self._call(self._streamer.flush())

    def close(self) -> IngestTotals:
        """Flush, end the stream, and stop the background loop."""
        try:
            return self._call(self._streamer.close())
        finally:
            self._shutdown()

    def abort(self) -> None:
        try:
            self._call(self._streamer.abort())
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if not self._loop.is_running():
            return
        with contextlib.suppress(Exception):
            self._call(self._aio_client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> PredictionStreamer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
        else:
            self.abort()
